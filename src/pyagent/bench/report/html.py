"""A self-contained HTML report from result files: inline SVG plots, no scripts, nothing fetched."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from pyagent import __version__
from pyagent.bench.provenance import write_atomic
from pyagent.bench.report.headlines import Check
from pyagent.bench.report.records import write_records
from pyagent.bench.report.sections import Section, sections_for
from pyagent.errors import ConfigError

PAGE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""\
<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em }
h1 { font-size: 1.6em } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em }
h3 { font-size: 1em; margin: 1.2em 0 .3em }
.scroll { overflow-x: auto; max-width: 100% }
table { border-collapse: collapse; margin: .4em 0 .8em; font-size: 12px }
td, th { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top }
th { background: #f3f3f3 } td.num { text-align: right; white-space: nowrap;
                                     font-variant-numeric: tabular-nums }
svg { max-width: 100%; height: auto } figure { margin: .5em 0 }
nav li { margin: .1em 0 } .note { color: #444 }
.met { color: #1a7f37; font-weight: 600 } .missed { color: #b42318; font-weight: 600 }
#summary td ul { margin: 0; padding-left: 1.1em }
</style></head><body>
<h1>{{ title }}</h1>
<p class="note">Generated {{ generated }} by PyAgent {{ version }} from
{% for source in sources %}<code>{{ source }}</code>{{ ", " if not loop.last }}{% endfor %}.</p>
<section id="summary"><h2>Summary</h2>
<div class="scroll"><table><tr><th>result</th><th>headline figures</th><th>targets</th></tr>
{% for s in summaries %}<tr><td><a href="#s{{ s.index }}">{{ s.name }}</a></td>
<td><ul>{% for h in s.headlines %}<li>{{ h }}</li>{% endfor %}</ul></td>
<td>{% if s.checks %}<ul>{% for c in s.checks %}<li>\
<span class="{{ 'met' if c.met else 'missed' }}">{{ "met" if c.met else "NOT MET" }}</span>: \
{{ c.target }} ({{ c.measured }})</li>\
{% endfor %}</ul>
{% else %}none declared{% endif %}</td></tr>
{% endfor %}</table></div></section>
<nav><ol>{% for s in sections %}<li><a href="#s{{ loop.index }}">{{ s.title }}</a></li>
{% endfor %}</ol></nav>
{% for s in sections %}<section id="s{{ loop.index }}"><h2>{{ s.title }}</h2>
{% for note in s.notes %}<p class="note">{{ note }}</p>{% endfor %}
{% for figure in s.figures %}<figure>{{ figure }}</figure>{% endfor %}
{% for t in s.tables %}{% if t.title %}<h3>{{ t.title }}</h3>{% endif %}
{% if t.note %}<p class="note">{{ t.note }}</p>{% endif %}
<div class="scroll"><table><tr>{% for h in t.headers %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in t.cells %}<tr>{% for c in row %}\
<td{{ ' class="num"'|safe if c.numeric }}>{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}</table></div>{% endfor %}
</section>{% endfor %}
</body></html>
""")


@dataclass(frozen=True)
class SummaryRow:
    index: int  # the section it links to
    name: str
    headlines: list[str]
    checks: list[Check]


def render(title: str, sources: Sequence[str], sections: Sequence[Section]) -> str:
    """The page for `sections`, a summary of them first (their SVG figures are trusted: they
    come from matplotlib)."""
    safe = [replace(s, figures=[Markup(f) for f in s.figures]) for s in sections]
    summaries = [SummaryRow(index, s.summary.name, s.summary.headlines, s.summary.checks)
                 for index, s in enumerate(sections, 1) if s.summary is not None]
    return PAGE.render(title=title, sources=sources, sections=safe, summaries=summaries,
                       version=__version__,
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
