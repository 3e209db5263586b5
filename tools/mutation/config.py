"""What to mutate (`modules.toml`) and which survivors are equivalent (`equivalent.toml`)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
MODULES_FILE = HERE / "modules.toml"
EQUIVALENT_FILE = HERE / "equivalent.toml"


@dataclass(frozen=True)
class Module:
    name: str  # short name, for the command line and the report
    path: str  # the file mutated, relative to the repository root
    tests: tuple[str, ...]  # pytest arguments selecting its unit tests


@dataclass(frozen=True)
class Equivalent:
    """A surviving mutant judged equivalent: no test can tell it from the original."""

    mutant: str  # mutmut's name, e.g. services.router.routing.x_load_bound__mutmut_1
    mutated: str  # the mutated line as mutmut shows it (stripped), so a renumbered mutant
    # after an edit of its function is noticed instead of inheriting another's reason
    reason: str


def load_modules(path: Path = MODULES_FILE) -> list[Module]:
    with path.open("rb") as f:
        tables = tomllib.load(f)["module"]
    modules = [Module(t["name"], t["path"], tuple(t["tests"])) for t in tables]
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: module names must be unique, got {names}")
    return modules


def load_equivalents(path: Path = EQUIVALENT_FILE) -> dict[str, Equivalent]:
    with path.open("rb") as f:
        tables = tomllib.load(f).get("equivalent", [])
    return {t["mutant"]: Equivalent(t["mutant"], t["mutated"].strip(), t["reason"]) for t in tables}
