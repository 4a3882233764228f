"""The user errors: what the CLI prints as one line naming the key and the fix, and the
value checks every config section uses to raise them."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)
"""Errors raised for bad input; printed as one line instead of a traceback."""


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_int(key: str, value) -> None:
    if not is_positive_int(value):
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def check_non_negative_int(key: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ConfigError(f"{key}={value!r} must be an integer >= 0")


def check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{key}={value!r}: {hint}choose one of {', '.join(choices)}")


def allowed_sizes(step: int, maximum: int) -> str:
    """The multiples of ``step`` up to ``maximum`` (and ``maximum``), shortened when long."""
    sizes = sorted({*range(step, maximum + 1, step), maximum})
    shown = sizes if len(sizes) <= 8 else [*sizes[:3], "...", *sizes[-2:]]
    return ", ".join(map(str, shown))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def batch_message(global_batch: int, micro_batch: int, dp: int | None = None) -> str:
    unit = micro_batch * (dp or 1)
    factor = (f"train.micro_batch_size ({micro_batch})" if dp is None else
              f"train.micro_batch_size ({micro_batch}) * dp ({dp}) = {unit}")
    below, above = global_batch // unit * unit, (global_batch // unit + 1) * unit
    examples = f"{below} or {above}" if below else f"{above}"
    smaller = [m for m in range(micro_batch - 1, 0, -1) if global_batch % (m * (dp or 1)) == 0]
    alternative = f", or train.micro_batch_size={smaller[0]}" if smaller else ""
    return (f"train.global_batch_size ({global_batch}) must be a multiple of {factor}: "
            f"e.g. train.global_batch_size={examples}{alternative}")
