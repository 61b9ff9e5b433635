"""The import graph the project's rules ask for: model -> weights -> sampling -> distill -> tools, no circle between
files, and no module importing a command-line module (one with a `__main__` guard): what CLIs share lives in
library modules. Lazy imports inside functions count as imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("model", "weights", "sampling", "distill", "tools")


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (a package import names the package's __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a package path: the longest known prefix
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def is_cli(path: Path) -> bool:
    return "__name__ == \"__main__\"" in path.read_text() or "__name__ == '__main__'" in path.read_text()


def test_imports_run_down_the_layers():
    up = [(a, b) for a, deps in graph().items() for b in deps
          if LAYERS.index(b.split(".")[0]) > LAYERS.index(a.split(".")[0])]
    assert up == []


def test_no_module_imports_a_command_line_module():
    mods = modules()
    clis = {name for name, path in mods.items() if is_cli(path)}
    assert {"sampling.generate", "distill.train", "distill.make_dataset", "distill.export", "tools.convert"} <= clis
    assert [(a, b) for a, deps in graph().items() for b in deps if b in clis] == []


def test_no_import_circle():
    g, done, stack = graph(), set(), []

    def visit(node: str) -> None:
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        stack.append(node)
        for dep in sorted(g[node]):
            visit(dep)
        stack.pop()
        done.add(node)

    for node in sorted(g):
        visit(node)
