"""The ``quant:`` section: quantization-aware training in the SFT and distill stages, and what a
pipeline's quantize stage measures, saves and exports."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_hybrid.errors import (
    ConfigError,
    check_choice,
    check_non_negative_int,
    check_positive_int,
)
from megatron_hybrid.quantization.formats import FORMATS


@dataclass(kw_only=True)
class QuantConfig:
    format: str | None = None
    """Train the model fake-quantized in this format (fp8, nvfp4, int8_sq, int4_awq): the
    stage calibrates it by ModelOpt PTQ before the first step, so SFT becomes QAT and
    distillation QAD (the teacher stays unquantized); None: train unquantized. A quantize
    stage saves and exports the model in it (fp8 or nvfp4)."""
    calibration_samples: int = 16
    """Training samples run through the model to calibrate the quantizers' ranges."""
    compare: list[str] = field(default_factory=list)
    """A quantize stage: formats measured beside bf16 and ``format``, before it (not saved)."""
    heldout_samples: int = 32
    """A quantize stage: held-out samples of each format's loss."""
    task_data: bool = False
    """A quantize stage: calibrate and measure the loss on the arithmetic task's conversations
    (training and held-out splits) instead of ``data``'s splits."""
    task_samples: int = 0
    """A quantize stage: held-out task problems each format answers (a pipeline gives its
    own count)."""

    @property
    def enabled(self) -> bool:
        return self.format is not None

    @property
    def formats(self) -> list[str]:
        """A quantize stage's formats in the order measured; ``format``, saved, is last."""
        return [*self.compare, self.format]

    def validate(self) -> None:
        if self.format is not None:
            check_choice("quant.format", self.format, tuple(FORMATS))
        if not isinstance(self.compare, list):
            raise ConfigError(f"quant.compare={self.compare!r}: give a list of formats, e.g. "
                              f"[fp8]")
        for name in self.compare:
            check_choice("quant.compare", name, tuple(FORMATS))
        check_positive_int("quant.calibration_samples", self.calibration_samples)
        check_positive_int("quant.heldout_samples", self.heldout_samples)
        check_non_negative_int("quant.task_samples", self.task_samples)
