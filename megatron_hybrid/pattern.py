"""The hybrid layer pattern: one symbol per layer, the single source of a model's depth.

``M`` Mamba-2, ``*`` attention, ``-`` MLP, ``E`` MoE, ``H`` parallel heads (attention and
Mamba-2 heads side by side in one layer, after Hymba), and ``|`` marks a pipeline-stage
boundary. ``Pattern.layers`` (the symbols without ``|``) is what Megatron-Core's
``hybrid_override_pattern`` receives (``H`` as ``M``, see ``model/parallel_heads.py``); the
stages decide which layers each pipeline rank builds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

LAYER_KINDS = {"M": "Mamba-2", "*": "attention", "-": "MLP", "E": "MoE",
               "H": "parallel heads"}
"""Layer symbol -> name, in the order counts and descriptions list them."""
STAGE_BOUNDARY = "|"
VALID_SYMBOLS = ", ".join(
    f"{symbol} ({name})"
    for symbol, name in {**LAYER_KINDS, STAGE_BOUNDARY: "pipeline-stage boundary"}.items()
)


class PatternError(ValueError):
    """A pattern is malformed or cannot be split as asked; the message says how to fix it."""


@dataclass(frozen=True)
class Pattern:
    text: str
    """The pattern as given, ``|`` included."""
    layers: str
    """One symbol per layer, without ``|`` (Megatron-Core's ``hybrid_override_pattern``)."""
    explicit_stages: tuple[str, ...] | None
    """The layers of each pipeline stage when the text has ``|``, else None."""

    def __str__(self) -> str:
        return self.text

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def counts(self) -> dict[str, int]:
        """Layers of each kind (M, *, -, E, H), zeros included."""
        return {symbol: self.layers.count(symbol) for symbol in LAYER_KINDS}

    def stages(self, pp: int) -> tuple[str, ...]:
        """The layers of each of the ``pp`` pipeline stages.

        With ``|`` the marked stages are used as they are and must number exactly ``pp``
        (at pp=1 the marks are ignored, so one pattern serves single-stage debugging);
        without, the layers are split evenly, refusing a split that does not divide.
        """
        if not isinstance(pp, int) or pp < 1:
            raise PatternError(f"pipeline size must be a positive integer, got {pp!r}")
        if self.explicit_stages is not None and pp > 1:
            return self._check_explicit_stages(pp)
        if self.num_layers % pp:
            raise PatternError(self._uneven_split_message(pp))
        size = self.num_layers // pp
        return tuple(self.layers[start:start + size] for start in range(0, self.num_layers, size))

    def stage_offsets(self, pp: int) -> tuple[int, ...]:
        """Global index of the first layer of each pipeline stage."""
        offsets, start = [], 0
        for stage in self.stages(pp):
            offsets.append(start)
            start += len(stage)
        return tuple(offsets)

    def with_stages(self, sizes: Sequence[int]) -> Pattern:
        """This pattern's layers with ``|`` boundaries giving stages of the given sizes."""
        if sum(sizes) != self.num_layers or min(sizes, default=0) < 1:
            raise PatternError(
                f"stage sizes {tuple(sizes)} must be positive and sum to the "
                f"{self.num_layers} layers of {self.text!r}"
            )
        stages, start = [], 0
        for size in sizes:
            stages.append(self.layers[start:start + size])
            start += size
        return parse(STAGE_BOUNDARY.join(stages))

    def drop_layers(self, indices: Iterable[int]) -> Pattern:
        """This pattern without the layers at the given global indices (depth pruning).

        Stage boundaries stay where they are; a stage may shrink but not vanish.
        """
        dropped = set(indices)
        outside = sorted(i for i in dropped if not 0 <= i < self.num_layers)
        if outside:
            raise PatternError(
                f"layer indices {outside} are outside 0..{self.num_layers - 1} of {self.text!r}"
            )
        kept_stages, start = [], 0
        for number, stage in enumerate(self.explicit_stages or (self.layers,)):
            kept = "".join(s for i, s in enumerate(stage, start) if i not in dropped)
            if not kept:
                raise PatternError(
                    f"dropping layers {sorted(dropped)} would leave stage {number} ({stage!r}) "
                    f"of {self.text!r} empty: keep at least one layer per stage"
                )
            kept_stages.append(kept)
            start += len(stage)
        return parse(STAGE_BOUNDARY.join(kept_stages))

    def _check_explicit_stages(self, pp: int) -> tuple[str, ...]:
        found = len(self.explicit_stages)
        if found != pp:
            raise PatternError(
                f"pattern {self.text!r} marks {found} pipeline stages with '|' but the pipeline "
                f"size is {pp}: set the pipeline size to {found} or mark {pp} stages"
            )
        return self.explicit_stages

    def _uneven_split_message(self, pp: int) -> str:
        n = self.num_layers
        working = [size for size in range(1, n + 1) if n % size == 0]
        base, extra = divmod(n, pp)
        example = self.with_stages([base + (i < extra) for i in range(pp)]) if base else None
        suggestion = f", e.g. {example.text!r}" if example else ""
        return (
            f"cannot split the {n} layers of {self.text!r} evenly into {pp} pipeline stages: "
            f"pipeline sizes that divide {n} are {', '.join(map(str, working))}; "
            f"for an uneven split mark the stages with '|'{suggestion}"
        )


def parse(text: str) -> Pattern:
    """Check a pattern and split it into layers and (if ``|`` is present) stages."""
    if not text:
        raise PatternError(
            f"empty pattern: give one symbol per layer; valid symbols are {VALID_SYMBOLS}"
        )
    for position, symbol in enumerate(text):
        if symbol not in LAYER_KINDS and symbol != STAGE_BOUNDARY:
            raise PatternError(
                f"invalid symbol {symbol!r} at position {position} of {text!r}: "
                f"valid symbols are {VALID_SYMBOLS}"
            )
    stages = text.split(STAGE_BOUNDARY)
    _check_no_empty_stage(text, stages)
    explicit_stages = tuple(stages) if len(stages) > 1 else None
    return Pattern(text=text, layers="".join(stages), explicit_stages=explicit_stages)


def _check_no_empty_stage(text: str, stages: list[str]) -> None:
    start = 0
    for number, stage in enumerate(stages):
        if not stage:
            position = min(start, len(text) - 1)  # the '|' that closes (or, last, opens) it
            raise PatternError(
                f"empty pipeline stage {number} at position {position} of {text!r}: every stage "
                f"needs at least one layer, so no '||' and no '|' at the start or end"
            )
        start += len(stage) + 1


def describe(pattern: Pattern, pp: int = 1, params_per_layer: Sequence[int] | None = None) -> str:
    """A readable summary: the pattern, layers per kind, and per pipeline stage its layers,
    counts and (given ``params_per_layer``, one entry per layer) parameters."""
    if params_per_layer is not None and len(params_per_layer) != pattern.num_layers:
        raise ValueError(
            f"params_per_layer has {len(params_per_layer)} entries but {pattern.text!r} "
            f"has {pattern.num_layers} layers"
        )
    lines = [f"pattern {pattern.text} ({pattern.num_layers} layers: {_kinds(pattern.layers)})"]
    offsets = pattern.stage_offsets(pp)
    for number, (start, stage) in enumerate(zip(offsets, pattern.stages(pp))):
        end = start + len(stage)
        line = f"stage {number}: layers {start}-{end - 1} {stage} ({_kinds(stage)})"
        if params_per_layer is not None:
            line += f", {_format_count(sum(params_per_layer[start:end]))} params"
        lines.append(line)
    if params_per_layer is not None:
        lines.append(f"decoder layers: {_format_count(sum(params_per_layer))} params")
    return "\n".join(lines)


def _kinds(layers: str) -> str:
    """'2 Mamba-2, 1 attention' for the kinds present in ``layers``."""
    return ", ".join(
        f"{layers.count(symbol)} {name}" for symbol, name in LAYER_KINDS.items() if symbol in layers
    )


def _format_count(n: int) -> str:
    """3 significant digits with a unit: 1.23B, 45.6M, 169k, 512."""
    rounded = float(f"{n:.3g}")
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if rounded >= scale:
            return f"{rounded / scale:.3g}{unit}"
    return f"{rounded:.0f}"
