"""Success for this example: the project's tests pass.

    python check.py WORKSPACE    (exit code 0 on success)
"""

import subprocess
import sys

tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                       cwd=sys.argv[1], capture_output=True, text=True, timeout=300)
sys.exit(tests.returncode)
