"""Corpora: the built-in one every installation has, and where text files for tests, benchmarks
and the demo are found (no torch import: the API process uses this too)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from core.spec import BUILTIN_CORPORA

#: The repository's own corpora (``data/``, see ``data/README.md``): tinyshakespeare, public
#: domain. Present in a checkout, absent from an installed wheel.
REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
#: The one setting that locates corpora the repository may not redistribute (WikiText-2, PTB,
#: SST-2): a directory laid out as ``wikitext-2/valid.txt``, ``ptb/ptb.test.txt``, ...
CORPORA_DIR_ENV = "LMFORGE_CORPORA_DIR"


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


def corpora_dir() -> Path:
    """``$LMFORGE_CORPORA_DIR``; by default the ``shared/data`` directory beside the checkout
    (where the team's machines keep them)."""
    env = os.environ.get(CORPORA_DIR_ENV)
    return Path(env) if env else REPO_DATA_DIR.parent.parent / "shared" / "data"


def find_corpus(relpath: str) -> Path | None:
    """The file ``relpath`` (e.g. ``"tinyshakespeare/input.txt"``) from the repository's
    ``data/`` or else from :func:`corpora_dir`; None when neither has it (callers skip or fall
    back to :func:`builtin_corpus`)."""
    for base in (REPO_DATA_DIR, corpora_dir()):
        path = base / relpath
        if path.is_file():
            return path
    return None
