"""The HTML report in a real browser (headless Chromium): it renders, its charts are not blank, the console
stays silent, and the page asks for nothing outside itself.

``REPORT_SCREENSHOT=docs/report-screenshot.png pytest tests/report/test_report_render.py`` also keeps the
screenshot of the demo data (the one the README shows), reduced to a small palette PNG.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from PIL import Image
from psycopg import sql

from exporter.history import migrations
from tests.report.report_browser import blank_boxes, render, visible_boxes
from tests.report.report_scenario import load_demo
from tests.support.env import require_binary

RunReport = Callable[..., tuple[int, str]]


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_binary("chromium")


@pytest.fixture(scope="module")
def demo_url(pg_server: str) -> Iterator[str]:
    name = f"drl_report_demo_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(pg_server, dbname=name)
    migrations.apply(url)
    load_demo(url)
    yield url
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def demo_page(demo_url: str, run_report: RunReport, tmp_path: Path) -> Path:
    page = tmp_path / "report.html"
    code, err = run_report(
        "--database-url", demo_url, "--since", "2025-11-01", "--until", "2026-12-01",
        "--poll-interval-seconds", "300", "--output", str(page),
    )  # fmt: skip
    assert code == 0, err
    return page


def test_the_report_renders_with_non_blank_charts_and_a_silent_console(
    chromium: str, demo_page: Path, tmp_path: Path
) -> None:
    rendered = render(chromium, demo_page, tmp_path / "chromium")
    assert rendered.console == []
    # Two charts per policy, and the first policy's timeline and heat map fit in the screenshot.
    assert len(rendered.chart_boxes) == 8
    assert len(visible_boxes(rendered)) >= 2
    assert blank_boxes(rendered) == []
    target = os.environ.get("REPORT_SCREENSHOT")
    if target:
        with Image.open(rendered.screenshot) as opened:
            image = opened.convert("RGB")
        image.quantize(colors=128, method=Image.Quantize.FASTOCTREE).save(target, optimize=True)


def test_the_blank_chart_check_catches_an_empty_chart(chromium: str, demo_page: Path, tmp_path: Path) -> None:
    """The check above could pass vacuously: with every chart replaced by an empty SVG it must object."""
    emptied = tmp_path / "emptied.html"
    html = demo_page.read_text(encoding="utf-8")
    html = re.sub(
        r'<div class="chart"><svg.*?</svg>',
        '<div class="chart"><svg xmlns="http://www.w3.org/2000/svg" width="900" height="300"></svg>',
        html,
        flags=re.S,
    )
    emptied.write_text(html, encoding="utf-8")
    rendered = render(chromium, emptied, tmp_path / "chromium")
    assert len(visible_boxes(rendered)) >= 2
    assert blank_boxes(rendered) == visible_boxes(rendered)


def test_the_console_check_sees_a_request_leaving_the_page(chromium: str, tmp_path: Path) -> None:
    """A page that tries to load an external image: the CSP blocks it and the console says so."""
    page = tmp_path / "external.html"
    page.write_text(
        "<!DOCTYPE html><html><head>"
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'">'
        '</head><body><div class="chart"><img src="http://127.0.0.1:9/chart.png"></div></body></html>',
        encoding="utf-8",
    )
    rendered = render(chromium, page, tmp_path / "chromium")
    assert any("http://127.0.0.1:9/chart.png" in line for line in rendered.console), rendered.console


def test_the_page_is_self_contained(demo_page: Path) -> None:
    html = demo_page.read_text(encoding="utf-8")
    assert "<script" not in html
    assert "@import" not in html
    assert "@font-face" not in html
    assert re.findall(r'\bsrc="', html) == []
    # Only in-page links (the ranking's anchors, the SVGs' clip paths) and inline data (the colour bars).
    links = re.findall(r'href="([^"]*)"', html)
    assert {link[0] for link in links if not link.startswith("data:image/png;base64,")} == {"#"}
    assert re.findall(r"url\((?!#)", html) == []
    # Every chart's ids are its own: identical layouts would otherwise share clip-path ids.
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))


def test_the_exact_scenario_page_draws_thresholds_category_change_gap_and_alerts(
    scenario_url: str, run_report: RunReport, tmp_path: Path
) -> None:
    page = tmp_path / "exact.html"
    code, err = run_report(
        "--database-url", scenario_url, "--since", "2026-01-01", "--until", "2026-04-01",
        "--output", str(page),
    )  # fmt: skip
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    first = html[html.index('id="policy-1"') : html.index('id="policy-2"')]
    assert "1. ENTRIES_READ_PARTICIPANT_ANTISCAN" in first
    # The chart's legend names both thresholds; the change is labelled on the timeline.
    assert "WARNING 20 %" in first
    assert "CRITICAL 10 %" in first
    assert "A→B" in first
    assert "no history (gap, or policy absent)" in first
    assert "<td>2026-02-03T09:59:30Z</td><td>2026-02-03T12:00:00Z</td>" in first
    assert "DICTRateLimitCritical" in first
    assert first.count("<svg") == 2
    # The policy that vanished mid-period says so on its page.
    assert "Last snapshot 2026-01-15T23:59:30Z: no history after it" in html
