"""The house rules, read from the source (AST): imports point down and never form a circle, models/ and kernels/
are leaves, function-local imports only keep a heavy optional dependency lazy, files stay small, faces thin."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the repository keeps these folders at its top; they install as these packages of the one import name
FOLDERS = {"kdexport": "kdexport", "models": "kdexport.models", "kernels": "kdexport.kernels", "cli": "kdexport.cli"}
LEAVES = ("kdexport.models", "kdexport.kernels")
# heavy or optional
LAZY = {"onnx", "onnxruntime", "tensorrt", "triton", "ray", "matplotlib", "sklearn", "openvino", "polygraphy"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [FOLDERS[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in SOURCES.items()}


def imports(name: str) -> list[tuple[ast.stmt, list[str], bool]]:
    """(node, imported module names, inside a function) for every import statement of a module."""
    tree, package = TREES[name], name if SOURCES[name].name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                out.append((child, [a.name for a in child.names], local))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                out.append((child, [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base
                                    for a in child.names], local))
            visit(child, inner)

    visit(tree, False)
    return out


def project_edges(name: str) -> set[str]:
    return {m for _, mods, _ in imports(name) for m in mods if m in SOURCES and m != name}


def test_the_sources_are_found():
    assert {"kdexport.checkpoint", "kdexport.vocab", "kdexport.models.distilled", "kdexport.kernels.modules",
            "kdexport.cli.app"} <= set(SOURCES)
    assert {"kdexport.structure", "kdexport.models"} <= project_edges("kdexport.checkpoint")  # the walk resolves


def test_no_import_circle():
    """Depth-first search over module -> imported module; any back edge is a circle."""
    graph = {name: project_edges(name) for name in SOURCES}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    circles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_nothing_from_kdexport(leaf):
    """models/ and kernels/ import only themselves, torch and third-party code (never the pipeline)."""
    bad = [f"{name}:{node.lineno} imports {m}" for name in SOURCES if name == leaf or name.startswith(leaf + ".")
           for node, mods, _ in imports(name) for m in mods
           if m.split(".")[0] == "kdexport" and not (m == leaf or m.startswith(leaf + "."))]
    assert not bad, bad


def test_only_the_installed_name_is_imported():
    """Nothing imports the folders by their repository names (that would load a second copy of each module)."""
    bad = [f"{name}:{node.lineno} imports {m}" for name in SOURCES for node, mods, _ in imports(name)
           for m in mods if m.split(".")[0] in {"models", "kernels", "cli"}]
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.name}:{node.lineno} imports {m}" for m in names
                    if m and m.split(".")[0] in {"models", "kernels", "cli"}]
    assert not bad, bad


def test_the_package_is_one_copy():
    """In this process too, the folders load under kdexport.* only, from the repository's files."""
    import kdexport.cli
    import kdexport.kernels
    import kdexport.models

    assert not {"models", "kernels", "cli"} & set(sys.modules)
    for module, folder in ((kdexport.models, "models"), (kdexport.kernels, "kernels"), (kdexport.cli, "cli")):
        assert Path(module.__file__).parent.name == folder
    assert kdexport.models.DistilledStudent is sys.modules["kdexport.models.distilled"].DistilledStudent


def test_function_local_imports_only_keep_heavy_optional_dependencies_lazy():
    bad = [f"{name}:{node.lineno} imports {m} inside a function" for name in SOURCES
           for node, mods, local in imports(name) if local for m in mods if m.split(".")[0] not in LAZY]
    assert not bad, bad


def test_no_file_over_400_lines():
    files = [p for folder in (*FOLDERS, "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_package_faces_only_re_export():
    """A package's __init__.py holds a docstring, imports and __all__: the code lives in named modules."""
    bad = []
    for name, tree in TREES.items():
        if SOURCES[name].name != "__init__.py":
            continue
        for i, node in enumerate(tree.body):
            docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            dunder_all = isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
                "__all__"]
            version = name == "kdexport" and isinstance(node, ast.Assign) and [
                getattr(t, "id", None) for t in node.targets] == ["__version__"]
            if not (docstring or dunder_all or version or isinstance(node, ast.Import | ast.ImportFrom)):
                bad.append(f"{name}:{node.lineno} {type(node).__name__}")
    assert not bad, bad
