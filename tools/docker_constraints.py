"""Write the image's pip constraint: every package the container ships, at its version, except
the ones setup.py's INSTALL_REQUIRES pins exactly (``==``: the project's pins move those). A
package setup.py only bounds (``triton>=3.0``) stays at the container's version, and pip stops
with a conflict if that version is outside the bound.

    pip list --format=freeze | python tools/docker_constraints.py setup.py > constraint.txt

The Dockerfile runs it before any pip install. It reads setup.py with ast, so it needs neither
this package nor its dependencies, only `packaging`, which the container ships.

`pip list --format=freeze` writes `name==version` for every package, also for the ones the
container installed from a local folder. `pip freeze` writes those as `name @ file:///...`
(and editable ones as `-e ...`); pip refuses such lines in a constraint file, so they are left
out and named on stderr: feed this script `pip list --format=freeze` to constrain them too.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name


def exact_pins(setup_py: Path) -> set[str]:
    """The canonical names setup.py's INSTALL_REQUIRES pins with ``==``, read without running
    setup()."""
    for node in ast.parse(setup_py.read_text()).body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "INSTALL_REQUIRES"):
            requirements = [Requirement(r) for r in ast.literal_eval(node.value)]
            return {canonicalize_name(r.name) for r in requirements
                    if any(spec.operator == "==" for spec in r.specifier)}
    raise SystemExit(f"{setup_py}: no INSTALL_REQUIRES list; define it at the top level")


def constraint_lines(freeze: list[str], pinned_by_setup: set[str]) -> tuple[list[str], list[str]]:
    """(the `name==version` lines to constrain, the lines pip cannot take as constraints)."""
    kept, refused = [], []
    for line in (raw.strip() for raw in freeze):
        if not line or line.startswith("#"):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement:  # `-e ...`, `--option`: not a requirement at all
            refused.append(line)
            continue
        if requirement.url:  # `name @ file:///...`: pip allows only a name and a version
            refused.append(line)
        elif canonicalize_name(requirement.name) not in pinned_by_setup:
            kept.append(line)
    return kept, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setup_py", type=Path, help="the project's setup.py")
    args = parser.parse_args()
    if not args.setup_py.is_file():
        parser.error(f"{args.setup_py}: no such file; pass the project's setup.py")
    kept, refused = constraint_lines(sys.stdin.read().splitlines(),
                                     exact_pins(args.setup_py))
    for line in refused:
        print(f"not constrained (pip takes only name==version in a constraint file): {line}",
              file=sys.stderr)
    print("\n".join(kept))


if __name__ == "__main__":
    main()
