"""House style that ruff does not check: no function over 80 lines (tests excepted). The module cap of 450 lines it
once had is gone (issue 35): it made the code denser, not clearer; the loop's complexity is ruff's C901 in .ci/run."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION = 80

too_long = []
for path in sorted(ROOT.glob("**/*.py")):
    relative = path.relative_to(ROOT)
    if relative.parts[0] in ("tests", ".venv", "build") or "site-packages" in relative.parts:
        continue
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION:
                too_long.append(f"{relative}:{node.lineno}: {node.name} is {length} lines (at most {MAX_FUNCTION})")
print("\n".join(too_long) or f"sizes: every function within {MAX_FUNCTION} lines")
sys.exit(1 if too_long else 0)
