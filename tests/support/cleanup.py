"""Guarded removal of directory trees: tests delete only what they created themselves.

A removal built from a parsed or possibly-empty string is how a test suite deletes its own
checkout: ``Path("")`` is ``Path(".")``, the current directory. Every tree removal in the tests
goes through :func:`remove_tree`, which takes the path *and* the root that its creator made
(a handle returned by ``tempfile.mkdtemp`` or the like) and refuses anything outside that root
and anything that is, or contains, a directory no test may delete.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from shutil import rmtree

REPO_ROOT = Path(__file__).resolve().parents[2]


class UnsafeRemovalError(ValueError):
    """A removal was refused: the path is empty, relative, outside its root, or protected."""


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def protected_paths() -> list[Path]:
    """Directories that :func:`remove_tree` never deletes, nor anything that contains them:
    ``/``, the home directory, the current working directory, the repository root, the
    Python environment running the tests and the system temp directory itself."""
    paths = [Path("/"), REPO_ROOT, Path(sys.prefix), Path(tempfile.gettempdir())]
    with contextlib.suppress(RuntimeError, KeyError):
        paths.append(Path.home())
    with contextlib.suppress(OSError):  # the working directory may have been deleted
        paths.append(Path.cwd())
    return [_real(p) for p in paths]


def _absolute(path: Path | str, what: str) -> Path:
    if isinstance(path, str) and not path.strip():
        raise UnsafeRemovalError(f"refusing to remove: the {what} is an empty string")
    p = Path(path)
    if not p.is_absolute():
        raise UnsafeRemovalError(
            f"refusing to remove: the {what} {str(path)!r} is relative (it would be resolved "
            "against the current directory)"
        )
    return p


def check_removable(path: Path | str, *, root: Path | str) -> Path:
    """Return ``path`` (symlinks resolved) when :func:`remove_tree` may delete it.

    ``root`` is the directory that the caller's code created (e.g. with ``tempfile.mkdtemp``);
    ``path`` must be ``root`` or lie under it. Raises :class:`UnsafeRemovalError` when either is
    empty or relative, when ``path`` is outside ``root``, or when either one is, or contains, a
    protected directory (see :func:`protected_paths`). Deletes nothing.
    """
    real_path = _real(_absolute(path, "path"))
    real_root = _real(_absolute(root, "root"))
    for candidate, what in ((real_root, "root"), (real_path, "path")):
        for protected in protected_paths():
            if protected.is_relative_to(candidate):
                raise UnsafeRemovalError(
                    f"refusing to remove {path}: its {what} {candidate} is or contains the "
                    f"protected directory {protected}"
                )
    if not real_path.is_relative_to(real_root):
        raise UnsafeRemovalError(
            f"refusing to remove {path}: it is not under {root}, the root its creator made"
        )
    return real_path


def remove_tree(path: Path | str, *, root: Path | str, missing_ok: bool = True) -> None:
    """Delete the directory tree ``path``, which must be ``root`` or lie under it.

    ``root`` must be a directory that the caller's code created itself (a handle, never a
    path parsed from output or configuration). Raises :class:`UnsafeRemovalError` before
    touching anything when :func:`check_removable` refuses; ``FileNotFoundError`` when
    ``path`` does not exist and ``missing_ok`` is false; ``OSError`` when deletion fails
    (including when ``path`` is a symlink, which is never followed).
    """
    real_path = check_removable(path, root=root)
    if not os.path.lexists(path):
        if missing_ok:
            return
        raise FileNotFoundError(path)
    if Path(path).is_symlink():
        raise OSError(f"refusing to remove {path}: it is a symlink (to {real_path})")
    rmtree(path)
