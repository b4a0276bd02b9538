"""A module imported on first attribute access, so that a command only pays for the imports it uses.

``torch = lazy_import("torch")`` at the top of a module binds a stand-in; ``torch.nn`` then imports torch (once, via
:func:`importlib.import_module`) and forwards the attribute.  Nothing is put in ``sys.modules`` until the real
import runs, so other modules importing the same name are unaffected.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["lazy_import"]


class _LazyModule:
    """Stands for the module ``name`` until an attribute is asked for."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def _load(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._load(), attribute)

    def __repr__(self) -> str:
        return f"<lazily imported module {self._name!r}>"


def lazy_import(name: str) -> Any:
    """A stand-in for module ``name`` that imports it on first attribute access."""
    return _LazyModule(name)
