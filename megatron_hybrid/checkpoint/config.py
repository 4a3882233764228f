"""The checkpoint section: saving, loading and resuming (``checkpoint:`` in a recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.errors import ConfigError, check_positive_int


@dataclass(kw_only=True)
class CheckpointConfig:
    save_interval: int | None = None
    """Steps between checkpoints; None: save only at the end."""
    keep_last: int = 2
    """Checkpoints of this run kept on disk (older ones are deleted)."""
    load: str | None = None
    """A checkpoint directory to initialise the weights from (e.g. a previous stage); optimizer
    and data position start fresh."""
    resume: bool = True
    """Resume from this run's own latest checkpoint when there is one (takes precedence over
    ``load``)."""

    def validate(self) -> None:
        if self.save_interval is not None:
            check_positive_int("checkpoint.save_interval", self.save_interval)
        check_positive_int("checkpoint.keep_last", self.keep_last)
        if self.load is not None and not self.load:
            raise ConfigError("checkpoint.load is empty: give a checkpoint directory or null")
