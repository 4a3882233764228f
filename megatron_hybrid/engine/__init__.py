"""The training engine: one step on Megatron-Core's DDP, optimizer and schedules
(``training_step``), the training loop with checkpoints and evaluation (``training_loop``),
metrics (``metrics``), and the loop's sections (``config``).
"""
