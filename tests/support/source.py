"""Reading the project's source with `ast`, for the structural tests (tests/test_layers.py,
tests/test_one_home.py)."""
from __future__ import annotations

import ast


def docstring_ids(tree: ast.Module) -> set[int]:
    """id() of every docstring constant (module, class, function) in `tree`, so a check can skip prose."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids
