"""The core must not import the recipe layer, transformers or peft at import time (it must start fast and stay
usable without them)."""

import subprocess
import sys


def test_core_import_is_light():
    code = (
        "import sys, adaptermerge, adaptermerge.cli, adaptermerge.engine\n"
        "bad = sorted(m for m in ('transformers', 'peft', 'weaverec', 'accelerate', 'matplotlib', 'scipy') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported: {out.stdout.strip()}"


def _import_graph(root, package):
    """Module -> modules of the same package it imports (anywhere in the file, lazy imports included)."""
    import ast
    from pathlib import Path

    files = {p.stem: p for p in Path(root).glob("*.py")}
    files.update({p.parent.name: p for p in Path(root).glob("*/__init__.py")})  # subpackages count as modules
    graph = {}
    for name, path in files.items():
        depth = 0 if path.parent == Path(root) else 1  # a subpackage's own relative imports stay inside it
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                level = node.level - depth
                if node.level and level < 1:
                    continue
                if level == 1 and node.module:
                    edges.add(node.module.split(".")[0])
                elif level == 1:  # from . import x, y: submodules, or names of the package itself
                    edges |= {a.name if a.name in files else "__init__" for a in node.names}
                elif not node.level and node.module and node.module.split(".")[0] == package:
                    parts = node.module.split(".")
                    edges.add(parts[1] if len(parts) > 1 else "__init__")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == package:
                        edges.add(parts[1] if len(parts) > 1 else "__init__")
        graph[name] = edges & set(files)
    return graph


def _cycles(graph):
    """Every import cycle, as the list of modules along it (depth-first search)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_no_import_cycles():
    """Imports point one way (CLI -> engine -> operators -> tensors; recipe pipeline -> report): no module imports a
    module that imports it back, even lazily. The package's __init__ only re-exports, so edges into it are cycles."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    core = _import_graph(root / "adaptermerge", "adaptermerge")
    core.pop("__init__")  # it imports everything to re-export it; nothing may import it back
    assert not [m for m, e in core.items() if "__init__" in e], "modules importing the package itself"
    assert _cycles(core) == []
    recipe = _import_graph(root / "recipes" / "weaverec", "weaverec")
    recipe.pop("__init__", None)
    assert _cycles(recipe) == []
    assert "report" in recipe["pipeline"] and "pipeline" not in recipe["report"]


def test_no_import_cycles_in_the_shared_recipe_code_and_taskmerge():
    """The shared recipe modules and the task-merging recipe follow the same rule as WeaveRec."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for folder, package in (("recipe_common", "recipe_common"), ("taskmerge", "taskmerge")):
        graph = _import_graph(root / "recipes" / folder, package)
        graph.pop("__init__", None)
        assert _cycles(graph) == [], package
    tm = _import_graph(root / "recipes" / "taskmerge", "taskmerge")
    assert "report" in tm["pipeline"] and "pipeline" not in tm["report"]
