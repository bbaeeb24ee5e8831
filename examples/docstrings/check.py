"""Success for this example: every function in shapes.py has a docstring and the tests pass.

    python check.py WORKSPACE    (exit code 0 on success)
"""

import ast
import subprocess
import sys
from pathlib import Path

workspace = Path(sys.argv[1])
try:
    tree = ast.parse((workspace / "src/geometry/shapes.py").read_text())
except (OSError, SyntaxError) as exc:
    sys.exit(f"shapes.py is unreadable: {exc}")
missing = [f.name for f in ast.walk(tree)
           if isinstance(f, ast.FunctionDef) and ast.get_docstring(f) is None]
if missing:
    sys.exit(f"functions without a docstring: {', '.join(missing)}")
tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                       cwd=workspace, capture_output=True, text=True, timeout=300)
sys.exit(tests.returncode)
