"""The import rules of docs/architecture.md ("Layers"), checked two ways: statically over every
``import`` statement in the source (lazy imports inside functions included), and dynamically by
importing each layer in a fresh interpreter and listing what got loaded."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package (or sub-package) -> top-level modules it must never import, anywhere in its source.
WEB = ("fastapi", "starlette", "uvicorn")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "core": ("store", "app", "worker", "lmforge", "torch", "sqlalchemy", "alembic", "celery",
             "kombu", "redis", *WEB),
    "store": ("app", "worker", "lmforge", "torch", *WEB),
    "app": ("worker", "lmforge", "torch"),
    "worker/engine": ("store", "app", "lmforge", "sqlalchemy", "alembic", "celery", "kombu",
                      *WEB),
    "worker": ("app", "lmforge", *WEB),
    # The inference server (`lmforge serve`): an HTTP process of its own, so FastAPI is allowed.
    "worker/serve": ("app", "lmforge"),
    "migrations": ("app", "worker", "lmforge", "torch", *WEB),
}


def _imports(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports (absolute imports only: the
    project uses no relative ones)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            assert node.module is not None
            names.add(node.module.split(".")[0])
    return names


def _sources(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    if package == "worker":  # worker/engine and worker/serve have their own rules
        files = [f for f in files
                 if not {"engine", "serve"} & set(f.relative_to(REPO / "worker").parts)]
    return files


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_what_its_layer_forbids(package: str) -> None:
    files = _sources(package)
    assert files, f"no sources under {package}"
    bad = {str(f.relative_to(REPO)): sorted(_imports(f) & set(FORBIDDEN[package]))
           for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _modules(package: str, *, exclude: tuple[str, ...] = ()) -> list[str]:
    out = []
    for f in sorted((REPO / package).rglob("*.py")):
        name = ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if not any(name == e or name.startswith(e + ".") for e in exclude):
            out.append(name)
    return out


def test_the_kernel_loads_neither_side_nor_any_framework() -> None:
    loaded = _loaded_after_import(_modules("core"))
    assert loaded & set(FORBIDDEN["core"]) == set()
    assert "pydantic" in loaded  # the check would be vacuous if nothing was imported


def test_the_engine_loads_no_service_code() -> None:
    loaded = _loaded_after_import(_modules("worker/engine"))
    assert "torch" in loaded
    assert loaded & {"app", "store", "lmforge", "sqlalchemy", "celery", *WEB} == set()


def test_the_api_process_loads_neither_torch_nor_the_worker() -> None:
    loaded = _loaded_after_import(["app.main"])
    assert "fastapi" in loaded
    assert loaded & {"torch", "worker", "lmforge"} == set()


def test_nothing_outside_the_http_layer_loads_a_web_framework() -> None:
    modules = [*_modules("store"), "worker.runner", "worker.tasks", "worker.celery_app",
               "lmforge.cli", "lmforge.supervisor", "lmforge.processes", "lmforge.local"]
    loaded = _loaded_after_import(modules)
    assert "celery" in loaded and "sqlalchemy" in loaded
    assert loaded & {*WEB, "app"} == set()


def test_the_inference_server_loads_neither_the_api_nor_the_entry_points() -> None:
    loaded = _loaded_after_import(["worker.serve.app"])
    assert {"torch", "fastapi"} <= loaded
    assert loaded & {"app", "lmforge"} == set()
