"""The report of every committed benchmark result, as a reader sees it in a real browser (Debian's
chromium, headless): a summary first, formatted numbers right-aligned with units, no raw JSON,
nothing wider than the page, no empty charts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pyagent.bench.report.html import build_report

ROOT = Path(__file__).parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page(tmp_path_factory, chromium):
    from playwright.sync_api import sync_playwright

    out = tmp_path_factory.mktemp("report") / "report.html"
    build_report(sorted((ROOT / "benchmarks" / "results").glob("*.json")), out)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.goto(out.as_uri())
        if os.environ.get("PYAGENT_REPORT_SCREENSHOT"):
            tab.screenshot(path=os.environ["PYAGENT_REPORT_SCREENSHOT"], full_page=False)
        yield tab
        browser.close()


def test_the_summary_comes_first_with_every_benchmark_and_its_targets(page):
    assert page.locator("h2").first.inner_text() == "Summary"
    rows = page.locator("#summary tr").all_inner_texts()[1:]
    results = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.json"))
    assert [row.split("\t")[0] for row in rows] == results
    summary = page.locator("#summary").inner_text()
    assert "met:" in summary and "NOT MET:" in summary  # fleet modes misses its 30% target
    assert "none declared" in summary  # the driver-thread benchmark declares no target


def test_cells_show_formatted_numbers_right_aligned_and_no_raw_json(page):
    cells = page.evaluate("""() => [...document.querySelectorAll('section:not(#summary) td')]
        .map(td => ({
        text: td.innerText, align: getComputedStyle(td).textAlign,
        numeric: td.classList.contains('num')}))""")
    assert cells
    for cell in cells:
        assert len(cell["text"]) < 400, cell["text"][:200]
        assert not cell["text"].lstrip().startswith(("{", "[{", "[[")), cell["text"][:200]
    numbers = [c for c in cells if c["numeric"]]
    assert numbers and all(c["align"] == "right" for c in numbers)
    texts = {c["text"] for c in numbers}
    for expected in ("57.7 tok/s [50.1, 62.9]", "2,158 MiB [2,112, 2,176]", "2.44\u00d7", "44.7 s",
                     "$0.005691", "42.4%"):
        assert expected in texts, expected
    assert not [t for t in texts if re.search(r"\.\d{7,}", t)]  # no 15-digit floats


def test_the_page_never_scrolls_sideways_wide_tables_scroll_in_their_box(page):
    width = page.evaluate("() => document.documentElement.clientWidth")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    wide = page.evaluate("""() => [...document.querySelectorAll('div.scroll')]
        .filter(d => d.scrollWidth > d.clientWidth)
        .map(d => getComputedStyle(d).overflowX)""")
    assert wide and set(wide) == {"auto"}  # some tables are wider than the page, and scroll


def test_every_chart_has_something_drawn(page):
    charts = page.evaluate("""() => [...document.querySelectorAll('figure svg')].map(svg => ({
        lines: svg.querySelectorAll('path, use, rect').length,
        height: svg.getBoundingClientRect().height}))""")
    assert len(charts) >= 5
    assert all(c["lines"] > 3 and c["height"] > 50 for c in charts)
