"""How a request picks its tokens and when it ends; checked before any model loads (no
Megatron-Core import here)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_hybrid import mcore


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens and when it ends."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    """0: greedy (argmax); otherwise the logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all); not together with ``top_p``."""
    top_p: float = 0.0
    """Sample among the most likely tokens whose probabilities sum to p (0: all)."""
    stop: tuple[str, ...] = ()
    """Strings that end the text (excluded from it)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request (excluded from its tokens and text)."""

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: ask for at least 1 token")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature}: use 0 (greedy) or a positive "
                             f"number")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: use 0 (all tokens) or a positive count")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: use a probability in (0, 1], or 0 for all")
        if self.temperature == 0 and (self.top_k or self.top_p):
            raise ValueError(f"top_k={self.top_k}, top_p={self.top_p} at temperature 0: sampling "
                             f"needs a temperature > 0 (1.0 keeps the model's distribution)")
        if self.top_k and self.top_p:
            raise ValueError(f"top_k={self.top_k} and top_p={self.top_p}: Megatron-Core samples "
                             f"with one of them; set the other to 0")
        if any(not text for text in self.stop):
            raise ValueError("an empty stop string would stop at once: remove it")

    def engine_params(self) -> "mcore.SamplingParams":
        """Megatron-Core's parameters: no termination id and no stop words (stops are
        handled by the session), greedy as top-1."""
        from megatron_hybrid import mcore
        from megatron_hybrid.inference import engine as engines

        if self.temperature == 0:
            return engines.greedy(self.max_new_tokens)
        return mcore.SamplingParams(temperature=self.temperature, top_k=self.top_k,
                                    top_p=float(self.top_p),
                                    num_tokens_to_generate=self.max_new_tokens,
                                    termination_id=-1)
