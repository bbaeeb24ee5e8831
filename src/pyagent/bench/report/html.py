"""A self-contained HTML report from result files: inline SVG plots, no scripts, nothing fetched."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from pyagent import __version__
from pyagent.bench.provenance import write_atomic
from pyagent.bench.report.records import write_records
from pyagent.bench.report.sections import Section, sections_for
from pyagent.errors import ConfigError

PAGE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""\
<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222 }
h1 { font-size: 1.6em } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em }
table { border-collapse: collapse; margin: .8em 0; font-size: 12px }
td, th { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top }
th { background: #f3f3f3 } svg { max-width: 100%; height: auto }
nav li { margin: .1em 0 } .note { color: #444 }
</style></head><body>
<h1>{{ title }}</h1>
<p class="note">Generated {{ generated }} by PyAgent {{ version }} from
{% for source in sources %}<code>{{ source }}</code>{{ ", " if not loop.last }}{% endfor %}.</p>
<nav><ol>{% for s in sections %}<li><a href="#s{{ loop.index }}">{{ s.title }}</a></li>
{% endfor %}</ol></nav>
{% for s in sections %}<section id="s{{ loop.index }}"><h2>{{ s.title }}</h2>
{% for note in s.notes %}<p class="note">{{ note }}</p>{% endfor %}
{% for figure in s.figures %}<figure>{{ figure }}</figure>{% endfor %}
{% for t in s.tables %}<table><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endfor %}
</section>{% endfor %}
</body></html>
""")


def render(title: str, sources: Sequence[str], sections: Sequence[Section]) -> str:
    """The page for `sections` (their SVG figures are trusted: they come from matplotlib)."""
    safe = [Section(s.title, s.notes, [Markup(f) for f in s.figures], s.tables)
            for s in sections]
    return PAGE.render(title=title, sources=sources, sections=safe, version=__version__,
                       generated=datetime.now(UTC).isoformat(timespec="seconds"))


def load_result(path: Path) -> Any:
    """A result file's JSON; a missing or malformed file is an error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None


def write_html(out: Path, title: str, sources: Sequence[str], sections: Sequence[Section]) -> Path:
    """Write the page for `sections` to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render(title, sources, sections))
    return out


def build_report(paths: Sequence[Path], out: Path, title: str = "PyAgent report",
                 tables: Path | None = None) -> list[Path]:
    """Read every result in `paths` and write one HTML report to `out`; with `tables`, also every
    table of the report as a CSV file in that folder and as a table of `report.sqlite` there."""
    sections: list[Section] = []
    for path in paths:
        sections += sections_for(path.name, load_result(path))
    written = [write_html(out, title, [str(p) for p in paths], sections)]
    if tables is not None:
        written += write_tables(sections, tables)
    return written


def write_tables(sections: Sequence[Section], folder: Path) -> list[Path]:
    """Each table of `sections` as `folder/<name>.csv` and as table <name> of report.sqlite."""
    written = []
    for index, (section, number, table) in enumerate(
            (s, n, t) for s in sections for n, t in enumerate(s.tables, 1)):
        name = f"t{index + 1:02d}_{re.sub(r'[^a-z0-9]+', '_', section.title.lower())[:40]}"
        name = f"{name.rstrip('_')}_{number}"
        records = [dict(zip(table.columns, row, strict=True)) for row in table.rows]
        written.append(write_records(records, folder / f"{name}.csv"))
        write_records(records, folder / "report.sqlite", table=name)
    return [*written, folder / "report.sqlite"] if written else written
