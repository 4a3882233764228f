"""Recipe YAML + CLI ``key=value`` -> a typed ``RunConfig``, and the resolved config back to YAML.

One precedence chain: dataclass defaults < recipe (its ``base:`` files first, merged in order)
< CLI overrides. Every key at every depth must name a field and every value must have the
field's type; a mistake is one ``ConfigError`` line naming the dotted key and the fix.

A recipe::

    base: ../common.yaml          # optional: a path or a list of paths, relative to this file
    name: tiny-pretrain
    model: {flavor: tiny-nano-v2-12b, seq_length: 512}   # flavor fields, then explicit keys
    train: {max_steps: 200}

Scalars follow YAML 1.2 where YAML 1.1 surprises: ``3e-4`` is a float and only ``true`` /
``false`` are booleans (``on`` / ``off`` stay strings).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path

import yaml

from megatron_hybrid import sections
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.model import flavors
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.run_config import RunConfig

BASE_KEY = "base"
"""Top-level recipe key listing the recipes this one extends."""
FLAVOR_KEY = "flavor"
"""``model`` key naming a flavor whose fields are the base of the model section."""
OVERRIDE_EXAMPLE = "train.max_steps=200"


class RecipeNotFoundError(FileNotFoundError):
    """A recipe (or one of its bases) does not exist; the message names the path."""


def load_recipe(path: str | os.PathLike | None, overrides: typing.Iterable[str] = ()
                ) -> RunConfig:
    """The ``RunConfig`` of a recipe file (None: defaults only) with CLI ``key=value``
    overrides applied. Checks keys and types; ``RunConfig.validate()`` checks the values."""
    raw = {} if path is None else _read_with_bases(Path(path), ())
    raw = apply_overrides(raw, overrides)
    if BASE_KEY in raw:
        raise ConfigError(f"{BASE_KEY}: only a recipe file can name bases, not an override")
    return from_dict(raw)


def sections_of(path: str | Path) -> set[str]:
    """The top-level sections the recipe file at ``path`` sets, its bases' included."""
    return set(_read_with_bases(Path(path), ()))


def apply_overrides(raw: dict, overrides: typing.Iterable[str]) -> dict:
    """``raw`` with each ``key.sub=value`` set in turn (mappings are merged into sections)."""
    for text in overrides:
        keys, value = parse_override(text)
        update: object = value
        for key in reversed(keys):
            update = {key: update}
        raw = _merge(raw, update)
    return raw


def parse_override(text: str) -> tuple[list[str], object]:
    """``"train.lr=3e-4"`` -> ``(["train", "lr"], 0.0003)``; the value is parsed as YAML."""
    key, sep, value_text = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(part.strip() for part in keys):
        raise ConfigError(f"override {text!r}: expected key=value with a dotted key, e.g. "
                          f"{OVERRIDE_EXAMPLE}")
    try:
        value = yaml.load(value_text, Loader=sections.RecipeLoader)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {text!r}: cannot parse the value {value_text!r} as YAML "
                          f"({problem}); quote strings with special characters") from None
    return [part.strip() for part in keys], value


def from_dict(raw: dict) -> RunConfig:
    """A ``RunConfig`` from a nested mapping (recipe keys, ``base`` resolved)."""
    return _build(RunConfig, raw, "")


def non_default_items(cfg: RunConfig) -> list[tuple[str, object]]:
    """``(dotted key, value)`` of every value that differs from its default, in field order.

    The model is shown as ``model.flavor`` and the fields that differ from that flavor when
    its shape is a flavor's, else as all its fields that differ from the dataclass defaults.
    Each item also works as a CLI override.
    """
    items: list[tuple[str, object]] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, ModelConfig):
            items += _model_items(value)
        elif dataclasses.is_dataclass(value):
            items += [(f"{f.name}.{key}", item)
                      for key, item in _changed(value, type(value)()).items()]
        elif value != _default_of(f):
            items.append((f.name, value))
    return items


# -- reading recipe files ---------------------------------------------------------------------

def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict:
    """The recipe at ``path`` merged over its bases (recursively, in order)."""
    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"{BASE_KEY}: recipe inheritance cycle {names}: remove one of these "
                          f"{BASE_KEY} entries")
    raw = _read_yaml(path, chain[-1] if chain else None)
    bases = raw.pop(BASE_KEY, None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not (isinstance(bases, list) and all(isinstance(b, str) and b for b in bases)):
        raise ConfigError(f"{path}: {BASE_KEY}: expected a path or a list of paths relative to "
                          f"the recipe, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, _read_with_bases(path.parent / base, (*chain, resolved)))
    return _merge(merged, raw)


def _read_yaml(path: Path, included_by: Path | None) -> dict:
    if not path.is_file():
        origin = f" ({BASE_KEY} of {included_by})" if included_by else ""
        raise RecipeNotFoundError(f"recipe file not found: {path}{origin}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=sections.RecipeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (name:, model:, "
                          f"train:, ...), got {_describe_value(raw)}")
    return raw


def _merge(low: dict, high: dict) -> dict:
    """``high`` deep-merged over ``low``: mappings merge key by key, anything else replaces."""
    merged = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# -- building dataclasses ---------------------------------------------------------------------

def _build(cls: type, raw, prefix: str):
    """An instance of dataclass ``cls`` from ``raw``, checking keys and types; ``prefix`` is
    the dotted key of this section ('' at the top)."""
    if cls is ModelConfig and isinstance(raw, str):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {_describe_value(raw)}: "
                          f"for a flavor write {prefix}: {{{FLAVOR_KEY}: {raw}}} or "
                          f"{prefix}.{FLAVOR_KEY}={raw}")
    raw = _as_mapping(raw, prefix)
    if cls is ModelConfig:
        raw = _expand_flavor(raw, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_known_keys(raw, fields, prefix, extra=(FLAVOR_KEY,) if cls is ModelConfig else ())
    hints = _type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = _join(prefix, name)
        hint = hints[name]
        if _is_dataclass_type(hint):
            values[name] = _build(hint, value, key)
        else:
            values[name] = _check_type(value, hint, key)
    for name, f in fields.items():
        if name not in values and _is_required(f) and _is_dataclass_type(hints[name]):
            values[name] = _build(hints[name], {}, _join(prefix, name))  # names what it lacks
    missing = [name for name, f in fields.items() if name not in values and _is_required(f)]
    if missing:
        raise ConfigError(_missing_message(cls, prefix, missing, given=list(raw)))
    return cls(**values)


def _expand_flavor(raw: dict, prefix: str) -> dict:
    if FLAVOR_KEY not in raw:
        return raw
    raw = dict(raw)
    name = raw.pop(FLAVOR_KEY)
    key = _join(prefix, FLAVOR_KEY)
    if not isinstance(name, str):
        raise ConfigError(f"{key}: expected a flavor name (str), got {_describe_value(name)}")
    try:
        base = flavors.get_flavor(name).to_dict()
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    return {**base, **raw}


def _check_known_keys(raw: dict, fields: dict, prefix: str, extra: tuple[str, ...] = ()) -> None:
    valid = [*fields, *extra]
    for name in raw:
        if name in valid:
            continue
        key = _join(prefix, str(name))
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f"did you mean {_join(prefix, close[0])}? " if close else ""
        section = f"of {prefix}" if prefix else "at the top level"
        top = [BASE_KEY] if not prefix else []
        raise ConfigError(f"{key}: unknown key; {hint}valid keys {section}: "
                          f"{', '.join([*top, *valid])}")


def _as_mapping(raw, prefix: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys (e.g. {prefix}.<key>=...), "
                          f"got {_describe_value(raw)}")
    bad = [key for key in raw if not isinstance(key, str)]
    if bad:
        raise ConfigError(f"{_join(prefix, str(bad[0]))}: keys must be strings, got "
                          f"{_describe_value(bad[0])}")
    return raw


def _check_type(value, hint, key: str):
    """``value`` if it has type ``hint`` (an int is accepted, as float, for float)."""
    ok, converted = _matches(value, hint)
    if not ok:
        quote = (" (quote it to keep it text: in YAML '...', on the command line "
                 f"{key}='\"...\"')" if _matches("text", hint)[0]
                 and isinstance(value, (int, float, bool)) else "")
        raise ConfigError(f"{key}: expected {_describe_type(hint)}, got "
                          f"{_describe_value(value)}{quote}")
    return converted


def _matches(value, hint) -> tuple[bool, object]:
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _matches(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if hint is list or origin is list:
        if not isinstance(value, list):
            return False, value
        (item_hint,) = typing.get_args(hint) or (typing.Any,)
        items = [_matches(item, item_hint) for item in value]
        return all(ok for ok, _ in items), [converted for _, converted in items]
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # an annotation this loader does not check


def _describe_type(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        return f"a list of {_describe_type(typing.get_args(hint)[0])}"
    if hint is bool:
        return "bool (true or false)"
    if hint is float:
        return "float"
    return getattr(hint, "__name__", str(hint))


def _describe_value(value) -> str:
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})"


def _missing_message(cls: type, prefix: str, missing: list[str], given: list[str]) -> str:
    keys = ", ".join(_join(prefix, name) for name in missing)
    if cls is not ModelConfig:
        return f"{prefix or 'recipe'}: missing required {keys}"
    flavor = (f"set {_join(prefix, FLAVOR_KEY)} to one of {', '.join(flavors.FLAVORS)}")
    if not given:
        return f"{prefix}: no model given: {flavor}, or give every key of {prefix} ({keys})"
    return f"{prefix}: missing {keys}: give them, or {flavor} to start from its values"


def _type_hints(cls: type) -> dict:
    from megatron_hybrid.data.datasets import DataConfig
    from megatron_hybrid.data.tokenizer import TokenizerConfig

    return typing.get_type_hints(
        cls, localns={"DataConfig": DataConfig, "TokenizerConfig": TokenizerConfig})


def _is_dataclass_type(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# -- non-default values -----------------------------------------------------------------------

def _changed(value, reference) -> dict:
    """Fields of dataclass ``value`` that differ from ``reference`` (or have no default)."""
    changed = {}
    for f in dataclasses.fields(value):
        mine = getattr(value, f.name)
        theirs = getattr(reference, f.name) if reference is not None else _default_of(f)
        if mine != theirs:
            changed[f.name] = sections.plain(mine)
    return changed


def _model_items(model: ModelConfig) -> list[tuple[str, object]]:
    flavor, reference = _closest_flavor(model)
    if flavor is None:
        return [(f"model.{key}", value) for key, value in _changed(model, None).items()]
    return [("model.flavor", flavor),
            *((f"model.{key}", value) for key, value in _changed(model, reference).items())]


def _closest_flavor(model: ModelConfig) -> tuple[str | None, ModelConfig | None]:
    """The flavor with the model's required (shape) fields and the fewest other differences."""
    required = [f.name for f in dataclasses.fields(ModelConfig) if _is_required(f)]
    best: tuple[str | None, ModelConfig | None] = (None, None)
    best_changes = None
    for name in flavors.FLAVORS:
        candidate = flavors.get_flavor(name)
        if any(getattr(candidate, key) != getattr(model, key) for key in required):
            continue
        changes = len(_changed(model, candidate))
        if best_changes is None or changes < best_changes:
            best, best_changes = (name, candidate), changes
    return best
