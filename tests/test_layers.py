"""The floor plan as a test: which part of minilm may import which, and no import circle.

Layers (README, Architecture): the core (minilm/*.py, norms/, precision/) imports no wing;
minilm/train/ and minilm/analysis/ import only the core (and themselves); minilm/launch/ and the
Hydra launcher plugin may import anything. Every import counts, the ones inside functions too:
a function-level import is how a circle hides. Objects keep to their own modules: no module reaches
into a private attribute another module defines, and no class creates an attribute outside __init__.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("minilm", "hydra_plugins")
MAY_IMPORT = {
    "core": {"core"},
    "train": {"core", "train"},
    "analysis": {"core", "analysis"},
    "launch": {"core", "train", "analysis", "launch"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def layer(module: str) -> str:
    if module.startswith("hydra_plugins"):
        return "launch"  # the Hydra launcher runs the command line's jobs
    wing = module.split(".")[1] if module.count(".") else ""
    return wing if wing in ("train", "launch", "analysis") else "core"


def imported_modules(module: str) -> dict[str, int]:
    """The minilm modules `module` imports, anywhere in it, each with the line of its first import."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from minilm.norms import triton_ops` imports a module; `from minilm.norms import build_norm` a name
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import minilm.train.trainer` -> that module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.setdefault(name, node.lineno)
    return found


GRAPH = {module: imported_modules(module) for module in MODULES}


def test_the_graph_sees_module_and_function_level_imports():
    assert "minilm.config" in GRAPH["minilm.model"]  # module level
    assert "minilm.train.loop" in GRAPH["minilm.launch.cli"]  # inside main()
    assert set(layer(m) for m in MODULES) == set(MAY_IMPORT)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_the_layers_below_it(module):
    broken = [f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} ({layer(target)})"
              for target, line in GRAPH[module].items() if layer(target) not in MAY_IMPORT[layer(module)]]
    assert not broken, f"{layer(module)} may import only {sorted(MAY_IMPORT[layer(module)])}: " + "; ".join(broken)


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle of `graph` (as the list of its modules, first repeated last), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[module] = "done"
        return None

    for module in graph:
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_find_cycle_finds_a_hidden_circle_and_passes_a_tree():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 9}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1, "c": 1}, "b": {"c": 1}, "c": {}}) is None


def test_no_import_circle_in_minilm_and_the_hydra_plugin():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(
        f"{a} ({MODULES[a].relative_to(ROOT)}:{GRAPH[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def self_attributes(node: ast.AST, owner: str = "self") -> dict[str, int]:
    """The attributes of `owner` that `node` assigns, each with the line of its first assignment."""
    found: dict[str, int] = {}
    for sub in ast.walk(node):
        targets = sub.targets if isinstance(sub, ast.Assign) else \
            [sub.target] if isinstance(sub, ast.AnnAssign | ast.AugAssign) else []
        for target in targets:
            for e in ast.walk(target):
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == owner:
                    found.setdefault(e.attr, sub.lineno)
    return found


def private_names(tree: ast.AST) -> set[str]:
    """The private names a module defines: its functions, classes, globals and its objects' attributes."""
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    names |= set(self_attributes(tree)) | set(self_attributes(tree, "cls"))
    return {name for name in names if private(name)}


def private_reach_ins(trees: dict[str, ast.AST]) -> list[str]:
    """`obj._name` (or an import of `_name`) in one module, where `_name` is private to another minilm module."""
    own = {module: private_names(tree) for module, tree in trees.items()}
    anywhere = set().union(*own.values())
    found = []
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in anywhere - own[module] \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{module}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGES):
                found += [f"{module}:{node.lineno} imports {a.name}" for a in node.names if private(a.name)]
    return found


def attributes_outside_init(tree: ast.AST, module: str) -> list[str]:
    """Attributes a class's methods create that neither __init__ (or __post_init__) nor the class body declares."""
    found = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        declared = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        declared |= {t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        methods = [f for f in cls.body if isinstance(f, ast.FunctionDef)]
        for f in methods:
            if f.name in ("__init__", "__post_init__"):
                declared |= set(self_attributes(f))
        found += [f"{module}:{line} {cls.name}.{f.name} creates self.{attr}"
                  for f in methods if f.name not in ("__init__", "__post_init__")
                  for attr, line in self_attributes(f).items() if attr not in declared]
    return found


TREES = {module: ast.parse(path.read_text()) for module, path in MODULES.items()}


def test_the_object_checks_catch_a_reach_in_and_a_late_attribute():
    other = ast.parse("class Bar:\n    def __init__(self):\n        self._bar = 1\n")
    reaching = ast.parse("def close(trainer):\n    trainer._bar.close()\n")
    assert private_reach_ins({"a": other, "b": reaching}) == ["b:2 trainer._bar"]
    late = ast.parse("class Fit:\n    def __init__(self):\n        self.a = 1\n    def start(self):\n"
                     "        self.a, self._end = 2, 3\n")
    assert attributes_outside_init(late, "m") == ["m:5 Fit.start creates self._end"]


def test_no_module_reaches_into_another_modules_private_attributes():
    assert not private_reach_ins(TREES)


def test_no_class_creates_attributes_outside_init():
    assert not [line for module, tree in TREES.items() for line in attributes_outside_init(tree, module)]
