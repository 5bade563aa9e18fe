"""The example rules shipped with recdsl (the ``.rec`` files beside this module).

    rule = recdsl.examples.load("gated_delta")
    recdsl.examples.names()   # ['delta', 'deltaproduct', 'gated_delta', ...]
"""
from __future__ import annotations

from pathlib import Path

from ..errors import RecdslError

DIRECTORY = Path(__file__).resolve().parent


def names() -> list:
    """The shipped example rules' names, sorted."""
    return sorted(p.stem for p in DIRECTORY.glob("*.rec"))


def path(name: str) -> Path:
    """The file of the shipped example ``name`` ("gated_delta" or "gated_delta.rec")."""
    stem = name[:-4] if name.endswith(".rec") else name
    if stem in names():
        return DIRECTORY / f"{stem}.rec"
    raise RecdslError(f"no shipped example rule named '{name}'; the shipped examples are: "
                      + ", ".join(names()))


def load(name: str, **consts):
    """Compile the shipped example ``name``; keyword arguments override its ``const`` values."""
    from ..runtime.rule import load_file
    return load_file(path(name), consts)
