"""The report opened in a real browser: Playwright driving Debian's headless Chromium.

The page must render its plots, log nothing to the console and make no request of its own (every
request that is not the page's own file is aborted, so no test run leaves the machine). Without
Chromium the tests skip, except in CI (``CI=true``) where they fail. Screenshots go to
``$PERSONCAR_SCREENSHOTS`` when set (to look at them), else to the test's temp folder.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tasks.publish import gate_verdict
from tasks.report import build_report
from tests.unit.test_report import EVIL_CLASS, EVIL_FILE, GATE, make_fake_run, published_before

# Colours the report's plots draw with (matplotlib lines, sample boxes), RGB.
PLOT_BLUE, PLOT_RED, OTHER_GREEN = (29, 114, 243), (230, 57, 70), (42, 157, 143)


def near(png: bytes, colour: tuple[int, int, int], tol: int = 40) -> int:
    """How many pixels of a screenshot are within ``tol`` (sum of channel differences) of ``colour``."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.int32).reshape(-1, 3)
    return int((np.abs(pixels - np.array(colour)).sum(axis=1) <= tol).sum())


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_fake_run(tmp_path_factory.mktemp("browser"))
    previous = published_before(run, run.parent / "published", map50=0.5)
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    build_report(run, run / "report", previous=previous, gate=gate_verdict(metrics, previous, GATE))
    return run / "report" / "report.html"


@pytest.fixture()
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PERSONCAR_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture()
def offline(page):
    """The page with a log of its requests and console messages; only file: URLs load."""
    log: dict[str, list[str]] = {"requests": [], "console": [], "errors": []}
    page.on("request", lambda r: log["requests"].append(r.url))
    page.on("console", lambda m: log["console"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: log["errors"].append(str(e)))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
    return page, log


def test_report_renders_its_plots_with_no_console_message_or_request(offline, report: Path, shots: Path) -> None:
    page, log = offline
    page.set_viewport_size({"width": 1280, "height": 1000})
    page.goto(report.as_uri())
    assert log == {"requests": [report.as_uri()], "console": [], "errors": []}

    images = page.locator("img.plot")
    assert images.count() == 3
    for i in range(3):  # decoded and laid out, not broken-image icons
        assert images.nth(i).evaluate("img => img.complete && img.naturalWidth >= 300 && img.width > 0")
    assert page.locator("script").count() == 0
    # The top answers the question first: the decision, then the numbers against the promoted run.
    assert page.locator("#decision").inner_text().startswith("Promoted: mAP@.50IOU ")
    assert page.locator("table.headline tbody tr").first.inner_text().split()[0] == "mAP@.50IOU"
    assert page.locator("table.per-class td.better").count() >= 3
    # Data shows as text, never as markup.
    body = page.locator("body").inner_text()
    assert EVIL_CLASS in body and EVIL_FILE in body
    assert page.locator("main b").count() == 0

    top = page.screenshot()
    (shots / "report-top.png").write_bytes(top)
    page.locator("#training").evaluate("h => h.scrollIntoView()")
    middle = page.screenshot()
    (shots / "report-middle.png").write_bytes(middle)
    full = page.screenshot(full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # nothing wider than the window
    # The loss and PR curves (blue/red lines) and the sample boxes (class colours) are on screen.
    assert near(full, PLOT_BLUE) > 2000 and near(full, PLOT_RED) > 1000 and near(full, OTHER_GREEN) > 300
    assert near(top, (19, 121, 91)) > 200  # the green of "Promoted" and of the improvements


def test_the_checks_catch_an_external_resource(offline, report: Path, tmp_path: Path) -> None:
    """Controls: the same page with an external image is caught by both checks: the console (the page's
    security policy refuses the image) and the request log, which sees the attempt with or without the
    policy."""
    page, log = offline
    bad = tmp_path / "with_csp.html"
    bad.write_text(report.read_text().replace("</main>", '<img src="http://example.invalid/x.png"></main>'))
    with page.expect_console_message(lambda m: "Content Security Policy" in m.text and "example.invalid" in m.text):
        page.goto(bad.as_uri())
    assert log["requests"] == [bad.as_uri(), "http://example.invalid/x.png"]

    no_csp = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", bad.read_text())
    assert no_csp != bad.read_text()
    bad2 = tmp_path / "without_csp.html"
    bad2.write_text(no_csp)
    with page.expect_request("http://example.invalid/x.png"):
        page.goto(bad2.as_uri())
    assert log["requests"][-2:] == [bad2.as_uri(), "http://example.invalid/x.png"]
    assert not [m for m in log["console"][1:] if "Content Security Policy" in m]

