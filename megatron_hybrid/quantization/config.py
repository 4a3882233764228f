"""The ``quant:`` section: quantization-aware training in the SFT and distill stages."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.errors import check_choice, check_positive_int
from megatron_hybrid.quantization.formats import FORMATS


@dataclass(kw_only=True)
class QuantConfig:
    format: str | None = None
    """Train the model fake-quantized in this format (fp8, nvfp4, int8_sq, int4_awq): the
    stage calibrates it by ModelOpt PTQ before the first step, so SFT becomes QAT and
    distillation QAD (the teacher stays unquantized); None: train unquantized."""
    calibration_samples: int = 16
    """Training samples run through the model to calibrate the quantizers' ranges."""

    @property
    def enabled(self) -> bool:
        return self.format is not None

    def validate(self) -> None:
        if self.format is not None:
            check_choice("quant.format", self.format, tuple(FORMATS))
        check_positive_int("quant.calibration_samples", self.calibration_samples)
