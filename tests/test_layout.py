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


def _third_party_imports() -> dict[str, str]:
    """Top-level module -> the package file that imports it, for every import of a module outside the
    standard library and audioclf, at the top or inside a function."""
    import sys

    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top and top != "audioclf" and top not in sys.stdlib_module_names:
                    found.setdefault(top, path.name)
    return found


def test_every_import_is_declared_and_librosa_is_only_for_the_tests():
    import importlib.metadata as md
    import re

    tomllib = __import__("pytest").importorskip("tomllib")
    project = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["project"]
    requirement = re.compile(r"^[A-Za-z0-9._-]+")
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731 (PEP 503 names)
    runtime = {norm(requirement.match(r)[0]) for r in project["dependencies"]}
    extras = {norm(requirement.match(r)[0]) for name, reqs in project["optional-dependencies"].items() if name != "dev"
              for r in reqs if not r.startswith("audioclf")}
    assert "librosa" not in runtime | extras and "scipy" in runtime
    declared = runtime | extras
    # what a declared package brings with it (pydantic with fastapi) counts as declared through it
    brought = {norm(requirement.match(r)[0]) for d in declared for r in (md.requires(d) or []) if "extra ==" not in r}
    providers = md.packages_distributions()
    for module, where in _third_party_imports().items():
        dists = {norm(d) for d in providers.get(module, [module])}
        assert dists & (declared | brought), f"{where} imports {module}, which pyproject.toml does not declare"
        assert module != "librosa", f"{where} imports librosa, a test-only dependency"
