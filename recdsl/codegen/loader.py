"""Turning generated PyTorch source into callables.

Generated source is built only from validated identifiers (prefixed rule names), numbers and
fixed templates, so executing it cannot run anything a rule's text smuggles in; it runs in a
namespace that holds only torch and the support helpers.
"""
from __future__ import annotations

import torch

from . import torch_support


def load_function(source: str, name: str, filename: str = "<recdsl generated>"):
    namespace = {"torch": torch, "_rt": torch_support, "__builtins__": {}}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated text
    return namespace[name]
