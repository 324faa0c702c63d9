"""House style that ruff does not check: no module over 450 lines, no function over 80 (tests excepted)."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE, MAX_FUNCTION = 450, 80

too_long = []
for path in sorted(ROOT.glob("**/*.py")):
    relative = path.relative_to(ROOT)
    if relative.parts[0] in ("tests", ".venv", "build") or "site-packages" in relative.parts:
        continue
    text = path.read_text()
    if (lines := len(text.splitlines())) > MAX_FILE:
        too_long.append(f"{relative}: {lines} lines (at most {MAX_FILE})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION:
                too_long.append(f"{relative}:{node.lineno}: {node.name} is {length} lines (at most {MAX_FUNCTION})")
print("\n".join(too_long) or f"sizes: every module within {MAX_FILE} lines, every function within {MAX_FUNCTION}")
sys.exit(1 if too_long else 0)
