"""The package's imports point one way (apps -> evaluation/pipeline -> runtimes -> presses -> selection/cache ->
kernels), and no module imports itself back through another: read from the source, every import statement,
also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import adakv

# the package's source folders, by import name (the design card's top-level folders map into the namespace)
ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "adakv": ROOT / "adakv",
    "adakv.presses": ROOT / "presses",
    "adakv.pipeline": ROOT / "pipeline",
    "adakv.evaluation": ROOT / "evaluation",
}
# lower number = lower layer; a module may import its own layer's package and anything below
LAYERS = {
    "adakv.kernels": 0,
    "adakv.models": 0,
    "adakv.arguments": 0,
    "adakv.cache": 1,
    "adakv.selection": 1,
    "adakv.presses": 2,
    "adakv.runtimes": 3,
    "adakv.pipeline": 4,
    "adakv.evaluation": 5,
    "adakv.apps": 5,
}
TOP_LAYER = max(LAYERS.values())
# the one import that points up: `with press(model):` is a thin front over the transformers runtime
UPWARD_EXCEPTIONS = {("adakv.presses.base", "adakv.runtimes.hf.session")}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "adakv" and parts[0] in ("presses", "pipeline", "evaluation"):
                continue
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The adakv modules `name` imports (the longest known prefix of each imported name)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a module's own packages load first
                found.add(target)
    return found


def layer_of(module: str) -> tuple[str, int] | None:
    for package, level in LAYERS.items():
        if module == package or module.startswith(package + "."):
            return package, level
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def test_the_module_list_covers_the_installed_package(graph):
    assert Path(adakv.__file__).parent == FOLDERS["adakv"]
    assert {"adakv.presses.base", "adakv.runtimes.hf.session", "adakv.cache.flat", "adakv.kernels.cuda_flat"} <= set(graph)
    unplaced = [name for name in graph if name != "adakv" and name != "adakv.__main__" and layer_of(name) is None]
    assert unplaced == [], f"modules outside every layer: {unplaced}"


def test_imports_point_down(graph):
    upward = []
    for name, targets in graph.items():
        if name in ("adakv", "adakv.__main__"):  # the public facade and `python -m adakv` import everything
            continue
        package, level = layer_of(name)
        for target in targets:
            if target == "adakv":  # the facade imports every layer: only the top layer may use it
                if level < TOP_LAYER:
                    upward.append((name, target))
                continue
            if target == "adakv.__main__":
                continue
            target_package, target_level = layer_of(target)
            if (target_level > level or (target_level == level and target_package != package)) and (
                name, target) not in UPWARD_EXCEPTIONS and not (package == "adakv.evaluation" and target_package == "adakv.apps"):
                upward.append((name, target))
    assert upward == [], f"imports that point up or sideways: {upward}"


def test_no_import_cycles(graph):
    allowed = {(a, b) for a, b in UPWARD_EXCEPTIONS}
    edges = {name: {t for t in targets if (name, t) not in allowed and t != "adakv"} for name, targets in graph.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == [], f"import cycles: {cycles}"


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    """The graph reader finds relative and absolute imports, so the two tests above can fail."""
    module = tmp_path / "flat.py"
    module.write_text("from .layer import X\nfrom adakv.runtimes.hf import session\ndef f():\n    import adakv.pipeline\n")
    known = {"adakv.cache.layer", "adakv.runtimes.hf", "adakv.runtimes.hf.session", "adakv.pipeline", "adakv.cache.flat"}
    assert imported_modules("adakv.cache.flat", module, known) == {
        "adakv.cache.layer", "adakv.runtimes.hf", "adakv.runtimes.hf.session", "adakv.pipeline"
    }


CONCRETE_LAYERS = {"MaskedLayer", "FlatHeadwiseLayer"}


def test_only_the_cache_package_tests_for_a_concrete_layer_class():
    """Runtimes and presses talk to compressed layers through `CompressedLayer` (and its attributes)."""
    offenders = []
    for name, path in module_files().items():
        if name.startswith("adakv.cache"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                classes = node.args[1]
                names = {getattr(c, "id", getattr(c, "attr", None)) for c in getattr(classes, "elts", [classes])}
                if names & CONCRETE_LAYERS:
                    offenders.append(f"{name}:{node.lineno}")
    assert offenders == []
