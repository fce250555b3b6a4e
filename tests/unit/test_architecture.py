"""The package's import graph (function-level imports included) points one way and has no cycle:

    network -> placements -> autoparallel core -> autoparallel.data -> autoparallel.config
            -> autoparallel.planning -> autoparallel.engine -> launch;   ckpt_tools -> network, placements

`placements/` never imports paddle, and neither placements nor planning load it at run time (a 72B plan renders
on a machine without Paddle's kernels ever being touched)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("network", "placements", "autoparallel", "launch", "ckpt_tools")
# (module prefix, layer); the longest matching prefix wins. A module may import its own layer or lower ones.
LAYERS = [
    ("network", 0),
    ("placements", 1),
    ("autoparallel", 2),  # core: mesh, parallelize, batch, forward, step, SP, PP, memory_report, cpu_compat
    ("autoparallel.data", 3),
    ("autoparallel.config", 4),
    ("autoparallel.planning", 5),
    ("autoparallel.engine", 6),
    ("launch", 7),
]
CKPT_TOOLS_MAY_IMPORT = ("network", "placements", "ckpt_tools")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import of `name` loads (a submodule if it exists, else the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """Project modules imported anywhere in the file (module level and inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                resolved = _resolve(name)
                if resolved and resolved != module:
                    targets.add(resolved)
    return targets


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def test_every_project_module_is_in_a_layer():
    assert [m for m in MODULES if not m.startswith("ckpt_tools") and _layer(m) is None] == []


def test_no_import_runs_back_up_the_layers():
    upward = []
    for module, targets in GRAPH.items():
        for target in targets:
            if module.startswith("ckpt_tools"):
                if not target.startswith(CKPT_TOOLS_MAY_IMPORT):
                    upward.append(f"{module} -> {target} (ckpt_tools depends on network and placements only)")
            elif target.startswith("ckpt_tools"):
                if not module.startswith("launch"):
                    upward.append(f"{module} -> {target} (only launch/ drives ckpt_tools)")
            elif _layer(target) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) -> {target} (layer {_layer(target)})")
    assert upward == []


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [module, target]))
            elif target not in state:
                visit(target, stack + [module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_placements_never_import_paddle():
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith("placements"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{module}: {n}" for n in names if n.split(".")[0] == "paddle"]
    assert offenders == []


@pytest.mark.parametrize("modules", [
    ["placements.qwen2_vl", "placements.lora", "placements.degrees"],
    ["autoparallel.planning.setup", "autoparallel.planning.fit", "autoparallel.planning.render"],
])
def test_plans_load_without_paddle(modules):
    code = f"import sys\nimport {', '.join(modules)}\nprint('paddle' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"


def test_the_graph_sees_function_level_imports():
    # launch/cli.py imports its commands inside functions; the graph must see those arrows.
    assert {"launch.plan", "launch.infer", "launch.demo", "launch.train"} <= GRAPH["launch.cli"]


def test_make_test_collects_every_test_folder():
    # `make test` runs `pytest tests`: every folder of test files must be collected from there (pytest's default
    # norecursedirs holds "dist"; pytest.ini overrides it).
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=REPO, capture_output=True, text=True)
    collected = {line.split("::")[0].rsplit("/", 1)[0] for line in out.stdout.splitlines() if "::" in line}
    folders = {str(p.parent.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")}
    assert folders <= collected, out.stdout[-2000:]


def test_test_file_names_are_unique():
    # pytest imports test files by basename (no __init__.py): a second file of the same name silently drops a folder.
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
