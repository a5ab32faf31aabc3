"""Headless Chromium (Debian's ``chromium``) for the report tests: a screenshot, the console messages, and
where the charts were laid out.

The page itself runs no script (its Content-Security-Policy forbids them), so the chart boxes are measured
on a copy with the CSP removed and one measuring script appended after everything else: same window size,
same layout, and ``--dump-dom`` prints the DOM after the script ran.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageStat

WINDOW = (1100, 2600)
MEASURE = """<script>
document.body.setAttribute("data-chart-boxes", JSON.stringify(
  Array.from(document.querySelectorAll(".chart svg")).map(function (e) {
    var r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })));
</script>"""


@dataclass(frozen=True, slots=True)
class Rendered:
    screenshot: Path
    console: list[str]
    chart_boxes: list[tuple[float, float, float, float]]


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--enable-logging=stderr", "--v=0", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def console_messages(stderr: str) -> list[str]:
    """Everything the page wrote to the console (Chromium logs it as ``INFO:CONSOLE...``)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def render(binary: str, page: Path, workdir: Path) -> Rendered:
    workdir.mkdir(parents=True, exist_ok=True)
    shot = workdir / "screenshot.png"
    result = _chromium(binary, workdir / "profile", f"--screenshot={shot}", page.resolve().as_uri())
    assert shot.exists(), result.stderr[-3000:]
    measured = workdir / "measured.html"
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text(encoding="utf-8"))
    measured.write_text(text.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = _chromium(binary, workdir / "profile-measure", "--dump-dom", measured.resolve().as_uri())
    found = re.search(r'data-chart-boxes="([^"]*)"', dom.stdout)
    boxes = json.loads(found.group(1).replace("&quot;", '"')) if found else []
    return Rendered(shot, console_messages(result.stderr), [tuple(b) for b in boxes])


def blank_boxes(rendered: Rendered, min_stddev: float = 12.0) -> list[tuple[float, float, float, float]]:
    """Chart boxes (inside the screenshot) whose pixels hardly vary: an empty or failed chart."""
    with Image.open(rendered.screenshot) as opened:
        image = opened.convert("L")
    blank = []
    for left, top, width, height in rendered.chart_boxes:
        if top + height > image.height or width < 10 or height < 10:
            continue
        crop = image.crop((int(left), int(top), int(left + width), int(top + height)))
        if ImageStat.Stat(crop).stddev[0] < min_stddev:
            blank.append((left, top, width, height))
    return blank


def visible_boxes(rendered: Rendered) -> list[tuple[float, float, float, float]]:
    with Image.open(rendered.screenshot) as image:
        height = image.height
    return [b for b in rendered.chart_boxes if b[1] + b[3] <= height]
