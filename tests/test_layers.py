"""The package's shape, as koboldlite/__init__.py declares it: each module uses only the modules listed before it,
none is over 600 lines and no function over 80, so that the code stays many small layers (and never again one
file of thousands of lines that nobody can hold in their head)."""

from __future__ import annotations

import ast
import os

import pytest

from tests.harness import load_builder

build_single = load_builder()
MODULES = build_single.read_package()
MOST_LINES_A_MODULE = 600
MOST_LINES_A_FUNCTION = 80


@pytest.mark.parametrize("module", MODULES[1:], ids=lambda m: m.name)
def test_a_module_imports_only_the_layers_below_it(module):
    order = [m.name for m in MODULES]
    for node in module.internal:
        target = module.target(node)
        assert order.index(target) < order.index(module.name), \
            f"{module.rel}:{node.lineno} imports {target}, listed after it in LAYERS"


def test_no_module_and_no_function_is_too_long():
    too_long = []
    for m in MODULES:
        lines = m.source.count("\n")
        if lines > MOST_LINES_A_MODULE:
            too_long.append(f"{m.rel}: {lines} lines")
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - start + 1 > MOST_LINES_A_FUNCTION:
                    too_long.append(f"{m.rel}:{start} {node.name}: {node.end_lineno - start + 1} lines")
    assert not too_long, "\n".join(too_long)


def test_the_launcher_only_starts_the_package():
    with open(os.path.join(build_single.ROOT, "koboldlite.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    code = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(code) <= 4, "koboldlite.py is the launcher: the code belongs in the package"
