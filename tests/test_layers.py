"""The import graph of ``d2l_jax``: imports point down the layers, never in a cycle, never inside a function."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "d2l_jax"

# The one statement of the layer order, lowest first: a module may import its own layer and the ones below.
LAYERS = (
    ("d2l_jax.sharding", "d2l_jax.models"),
    ("d2l_jax.hypernet", "d2l_jax.data"),
    ("d2l_jax.api", "d2l_jax.pretrained", "d2l_jax.session", "d2l_jax.export", "d2l_jax.train", "d2l_jax.eval", "d2l_jax.baselines"),
    ("d2l_jax",),  # the package's own __init__: the public surface
)


def layer_of(module: str) -> int:
    matches = [(len(prefix), rank) for rank, prefixes in enumerate(LAYERS) for prefix in prefixes if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")
    return max(matches)[1]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported d2l_jax module, whether the import sits inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inside_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside_function.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from d2l_jax.eval import plots` imports the module d2l_jax.eval.plots, `from d2l_jax.api import D2L` d2l_jax.api.
            names = [f"{node.module}.{alias.name}" if is_module(f"{node.module}.{alias.name}") else node.module for alias in node.names]
        else:
            continue
        found += [(name, id(node) in inside_function) for name in names if name == "d2l_jax" or name.startswith("d2l_jax.")]
    return found


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_and_sit_at_module_level(module):
    for imported, in_function in GRAPH[module]:
        assert not in_function, f"{module} imports {imported} inside a function"
        assert layer_of(imported) <= layer_of(module), f"{module} (layer {layer_of(module)}) imports the higher layer's {imported}"


def test_no_import_cycle():
    edges = {m: {name for name, _ in names if name in GRAPH and name != m} for m, names in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import d2l_jax.api\n\ndef f():\n    from d2l_jax.models import lora\n")
    assert set(imports(bad)) == {("d2l_jax.api", False), ("d2l_jax.models.lora", True)}
    assert layer_of("d2l_jax.models.lora") < layer_of("d2l_jax.hypernet.head") < layer_of("d2l_jax.api")
