"""Command-line option types shared by every ``recdsl`` subcommand: ``--dims K=64,V=64`` and
``--const topk=4``. A bad string is an argparse usage error, never a traceback."""
from __future__ import annotations

import argparse


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def _size(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def assignments(convert, what):
    """An argparse type for ``NAME=VALUE[,NAME=VALUE...]``."""
    def parse(text: str) -> dict:
        out = {}
        for part in text.split(","):
            name, sep, value = part.partition("=")
            name, value = name.strip(), value.strip()
            try:
                if not (sep and name.isidentifier()):
                    raise ValueError
                out[name] = convert(value)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected NAME={what}[,NAME={what}...], got {text!r}") from None
        return out
    return parse


dims_type = assignments(_size, "SIZE")
consts_type = assignments(_number, "NUMBER")


def add_dims_option(parser, defaults: str, metavar: str = "K=64,V=64"):
    parser.add_argument("--dims", action="append", metavar=metavar, type=dims_type,
                        help=f"dim sizes ({defaults}); repeatable")


def add_const_option(parser):
    parser.add_argument("--const", action="append", metavar="NAME=VALUE", type=consts_type,
                        help="override a const of the rule, e.g. --const topk=4 (repeatable)")


def merged(dicts) -> dict:
    """The dicts of a repeatable option as one (later ones win)."""
    out = {}
    for d in dicts or ():
        out.update(d)
    return out
