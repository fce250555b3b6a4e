"""The bench scripts are not run by `make test` (they take minutes and print ratios), so a rename in the project
would break them unnoticed: every name they import from the project, from bench/ or from tests/helpers must
exist. Project modules are imported; bench/ and helper files are only parsed (importing `common` would pin the
BLAS threads of this test process)."""
from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = ("network", "placements", "autoparallel", "launch", "ckpt_tools")
LOCAL_DIRS = (REPO / "bench", REPO / "tests" / "helpers")


def _top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _local_file(module: str) -> Path | None:
    return next((d / f"{module}.py" for d in LOCAL_DIRS if (d / f"{module}.py").is_file()), None)


@pytest.mark.parametrize("script", sorted((REPO / "bench").glob("*.py")), ids=lambda p: p.name)
def test_every_imported_name_exists(script):
    missing = []
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            local = _local_file(node.module)
            if local is not None:
                defined = _top_level_names(local)
                missing += [f"{node.module}.{a.name}" for a in node.names if a.name not in defined]
            elif node.module.split(".")[0] in PROJECT:
                module = importlib.import_module(node.module)
                missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT:
                    importlib.import_module(alias.name)
                elif _local_file(alias.name) is None and importlib.util.find_spec(alias.name.split(".")[0]) is None:
                    missing.append(alias.name)
    assert not missing, f"{script.name} imports names that do not exist: {missing}"
