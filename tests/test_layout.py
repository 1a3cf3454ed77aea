"""The package's shape: data flows one way between its modules (no import circle), read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

import audioclf

PACKAGE = Path(audioclf.__file__).parent
# every module, sub-packages' included, by its dotted name under audioclf ("train", "commands.predict")
MODULES = sorted(".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py"))
LIMIT_LINES = 500  # no module longer


def source(module: str) -> Path:
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _known(name: str) -> str:
    """The package module that ``name`` (a dotted name under audioclf) is, or lies in: the longest that
    exists, so "commands.predict.run_predict" is "commands.predict" and "" the package itself."""
    parts = name.split(".") if name else []
    return next((m for m in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if m in MODULES), "__init__")


def imported_modules(path: Path, module: str = "") -> set[str]:
    """The package modules that ``path`` (module ``module``) imports, at its top or inside a function: a lazy
    import that closes a circle is still a circle, only one that fails later."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = [p for p in package if p not in ("", "__init__")]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:  # from .x import y / from ..x import y / from . import x
            prefix = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "audioclf":
            prefix = node.module.removeprefix("audioclf").lstrip(".")
        elif isinstance(node, ast.Import):
            found.update(_known(a.name.removeprefix("audioclf").lstrip("."))
                         for a in node.names if a.name.split(".")[0] == "audioclf")
            continue
        else:
            continue
        found.update(_known(f"{prefix}.{a.name}".lstrip(".")) for a in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: imported_modules(source(m), m) - {m} for m in MODULES}


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
    sub = tmp_path / "c.py"  # a module of the commands sub-package
    sub.write_text("from ..config import X\nfrom .parts import PartWriter\nfrom . import embed\n"
                   "from audioclf.commands import predict\n")
    assert imported_modules(sub, "commands.c") == {"config", "commands.parts", "commands.embed", "commands.predict"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle():
    graph = import_graph()
    assert {"checkpoint", "export", "model", "weights", "commands.predict", "commands.parts"} <= set(graph)
    assert graph["commands.predict"] >= {"commands.parts", "predict", "errors"}  # it reads the sub-package too
    cycle = find_cycle(graph)
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_saved_models_are_read_by_one_module_and_export_only_writes():
    graph = import_graph()
    assert "checkpoint" in graph["export"] and "export" not in graph["checkpoint"]
    export_names = {n.name for n in ast.parse(source("export").read_text()).body
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert not export_names & {"load_safetensors", "read_export_config", "is_safetensors_export", "_check_bound"}


def test_the_package_never_imports_torchvision():
    for m in MODULES:
        tree = ast.parse(source(m).read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        assert not [n for n in names if n.split(".")[0] == "torchvision"], f"{m}.py imports torchvision"


# ------------------------------------------------------------------------------------------- structure rules

def test_no_module_is_longer_than_the_limit():
    long = {m: n for m in MODULES if (n := len(source(m).read_text().splitlines())) > LIMIT_LINES}
    assert not long, f"modules over {LIMIT_LINES} lines: {long}"


def _function(module: str, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(ast.parse(source(module).read_text())) if isinstance(n, ast.FunctionDef)
                and n.name == name)


def test_fit_reads_on_one_screen():
    fit = _function("train", "fit")
    assert fit.end_lineno - fit.lineno + 1 <= 80


def backbone_branches(tree: ast.AST, names: set[str], classes: set[str]) -> list[int]:
    """Lines that decide by a backbone's or family's name (``backbone == "resnet18"``, ``family in (...)``)
    or by a network's class (``isinstance(model, AudioResNet)``)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            if any(isinstance(c, ast.Constant) and c.value in names for c in ast.walk(node)):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            if any(isinstance(c, ast.Name) and c.id in classes for c in ast.walk(node.args[1])):
                lines.append(node.lineno)
    return lines


def test_a_backbone_family_decides_in_one_table():
    from audioclf.backbones import BACKBONES
    from audioclf.model import FAMILIES

    assert {b.family for b in BACKBONES.values()} == set(FAMILIES)  # every family has its row, every row a use
    names = set(BACKBONES) | set(FAMILIES)
    classes = {"AudioResNet", "AudioMobileNet", "ResNet18", "MobileNet"}
    found = {m: lines for m in MODULES if (lines := backbone_branches(ast.parse(source(m).read_text()), names, classes))}
    assert not found, f"decisions by backbone name or network class outside model.FAMILIES (module: lines): {found}"
    # the reader sees each kind of branch
    sample = ast.parse('if config.backbone == "resnet18": pass\nx = b.family in ("mobilenet",)\n'
                       'if isinstance(model, AudioResNet): pass\ny = BACKBONES["resnet18"]\n')
    assert backbone_branches(sample, names, classes) == [1, 2, 3]


def test_the_error_type_comes_from_its_own_module():
    wrong = []
    for m in MODULES:
        for node in ast.walk(ast.parse(source(m).read_text())):
            if isinstance(node, ast.ImportFrom) and any(a.name == "AudioclfError" for a in node.names) \
                    and (node.module or "").split(".")[-1] != "errors":
                wrong.append(m)
    assert not wrong, f"AudioclfError imported from elsewhere than audioclf.errors in {wrong}"


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_training_does_not_import_the_inference_path():
    graph = import_graph()
    assert graph["metrics"] == set()  # a leaf: evaluate and train both score with it
    assert "metrics" in graph["train"] and "metrics" in graph["evaluate"]
    assert not _reachable(graph, "train") & {"predict", "evaluate", "serve", "commands.predict"}


def test_the_run_directory_names_its_files_in_one_place():
    from audioclf.rundir import RunDir

    names = {p.name for p in RunDir(".").outputs()}
    assert {"best.pt", "last.pt", "metrics.csv", "train.log", "skipped.csv", "curves.png"} <= names
    found = {m: sorted({n.value for n in ast.walk(ast.parse(source(m).read_text()))
                        if isinstance(n, ast.Constant) and n.value in names})
             for m in ("train", "cv", "cli", "demo", "evaluate")}
    assert not {m: v for m, v in found.items() if v}, f"run-directory file names outside rundir.py: {found}"


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
