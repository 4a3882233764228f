"""Config sections as plain data and YAML, for every layer: the YAML dialect of recipes and
resolved configs, and one section read back from a run's ``config.yaml``.

Scalars follow YAML 1.2 where YAML 1.1 surprises: ``3e-4`` is a float and only ``true`` /
``false`` are booleans (``on`` / ``off`` stay strings). The recipe loader (``recipe``) builds
whole ``RunConfig`` objects on top of this.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

import yaml


def to_dict(cfg) -> dict:
    """The config as plain nested dicts / lists / scalars (the model fully expanded)."""
    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg) -> str:
    """The resolved config as YAML that ``load_recipe`` reads back to an equal config."""
    return yaml.dump(to_dict(cfg), Dumper=RecipeDumper, sort_keys=False,
                     default_flow_style=False, allow_unicode=True)


def save_resolved(cfg, path: str | os.PathLike) -> Path:
    """Write ``dump_yaml(cfg)`` to ``path`` atomically (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(dump_yaml(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path


def plain(value):
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


_BOOL_TAG = "tag:yaml.org,2002:bool"


_FLOAT_TAG = "tag:yaml.org,2002:float"


_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


_FLOAT_RE = re.compile(r"""^(?:
    [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
  | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?\.(?:inf|Inf|INF)
  | \.(?:nan|NaN|NAN)
)$""", re.VERBOSE)


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats, refusing duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeConstructor reports unhashable keys itself
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (a later one would silently win)", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class RecipeDumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings ``RecipeLoader`` would read as floats (``1e5``),
    keeping YAML 1.1's quoting of ``on`` / ``yes`` so other readers agree."""



RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(_BOOL_TAG, _BOOL_RE, list("tTfF"))
RecipeLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


RecipeDumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML file in the recipe dialect (duplicate keys refused)."""
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=RecipeLoader) or {}


def read_section(config_yaml: str | os.PathLike, name: str, cls: type):
    """Section ``name`` of a resolved ``config.yaml`` (which this project wrote) as ``cls``."""
    return cls(**read_yaml(config_yaml)[name])
