"""Entry points: the ``lmforge`` command, ``lmforge up`` and the process helpers they need.

``lmforge.load(path)`` loads an exported model (:mod:`lmforge.loader`; imported on first use,
so ``import lmforge`` stays free of torch)."""

from typing import Any

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from lmforge.loader import load

        return load
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
