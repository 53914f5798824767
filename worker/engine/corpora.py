"""Built-in corpora (no torch import: the API process uses this too)."""

from __future__ import annotations

from functools import lru_cache

from worker.spec import BUILTIN_CORPORA


@lru_cache(maxsize=4)
def builtin_corpus(name: str) -> str:
    """The text of a built-in corpus.

    ``python-docs``: the English text of Python's reference documentation shipped with every
    CPython (``pydoc_data.topics.topics``), values joined by a blank line in key order, about
    465k characters on CPython 3.11. Raises ``ValueError`` for an unknown name.
    """
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown builtin corpus {name!r}; known: {', '.join(BUILTIN_CORPORA)}")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
