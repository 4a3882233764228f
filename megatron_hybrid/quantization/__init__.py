"""ModelOpt quantization of the Megatron-Core model: the formats and which layers stay in bf16
(``formats``), post-training quantization and its measurements (``ptq``), the quantized
checkpoints for deployment (``export``)."""
