"""math/ is pure: its modules import only torch, jaxtyping, the standard library and each other."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import icon2_lens.math

ALLOWED = {"torch", "jaxtyping", "__future__"}
MATH = Path(icon2_lens.math.__file__).parent


def test_math_imports_only_torch_jaxtyping_stdlib_and_itself():
    bad = []
    for path in sorted(MATH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import ...: another math module
                    assert node.module is None or (MATH / f"{node.module.split('.')[0]}.py").exists(), (path, node.module)
                    continue
                if node.level > 1:
                    bad.append((path.name, "." * node.level + (node.module or "")))
                    continue
                names = [node.module or ""]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top not in ALLOWED and top not in sys.stdlib_module_names:
                    bad.append((path.name, n))
    assert not bad, f"math/ must stay pure (torch, jaxtyping, stdlib): {bad}"
