"""Success for this example: REPORT.md names the failing test and the function at fault.

    python check.py WORKSPACE    (exit code 0 on success)
"""

import sys
from pathlib import Path

report = Path(sys.argv[1]) / "REPORT.md"
text = report.read_text(errors="replace") if report.is_file() else ""
missing = [word for word in ("test_slug_lowercases", "slugify") if word not in text]
sys.exit(f"REPORT.md does not mention: {', '.join(missing)}" if missing else 0)
