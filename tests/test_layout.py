"""The package's shape: data flows one way between its modules (no import circle), read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

import audioclf

PACKAGE = Path(audioclf.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """The package modules ``path`` imports, at its top or inside a function: a lazy import that closes a
    circle is still a circle, only one that fails later."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y / from . import x
            names = [node.module] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("audioclf"):
            names = [node.module.removeprefix("audioclf").lstrip(".") or "__init__"]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("audioclf").lstrip(".") or "__init__"
                     for a in node.names if a.name.split(".")[0] == "audioclf"]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in MODULES)
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: imported_modules(PACKAGE / f"{m}.py") - {m} for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] when the graph is acyclic (depth-first search)."""
    done, path = set(), []

    def visit(m: str) -> list[str]:
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return []
        path.append(m)
        for dep in sorted(graph[m]):
            cycle = visit(dep)
            if cycle:
                return cycle
        path.pop()
        done.add(m)
        return []

    for m in sorted(graph):
        cycle = visit(m)
        if cycle:
            return cycle
    return []


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from .config import X\nfrom . import fileio\nimport audioclf.model\n"
                   "from audioclf.weights import sha256\ndef f():\n    from .export import export\n")
    assert imported_modules(src) == {"config", "fileio", "model", "weights", "export"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle():
    graph = import_graph()
    assert {"checkpoint", "export", "model", "weights"} <= set(graph)  # the reader found the package
    cycle = find_cycle(graph)
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_saved_models_are_read_by_one_module_and_export_only_writes():
    graph = import_graph()
    assert "checkpoint" in graph["export"] and "export" not in graph["checkpoint"]
    export_names = {n.name for n in ast.parse((PACKAGE / "export.py").read_text()).body
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not export_names & {"load_safetensors", "read_export_config", "is_safetensors_export", "_check_bound"}


def test_the_package_never_imports_torchvision():
    for m in MODULES:
        tree = ast.parse((PACKAGE / f"{m}.py").read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        assert not [n for n in names if n.split(".")[0] == "torchvision"], f"{m}.py imports torchvision"
