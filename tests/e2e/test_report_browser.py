"""The report opened in a real browser (headless Chromium, Debian package ``chromium``).

The page must render its charts, log nothing to the console and make no request of its own.
Chromium's own background services are pointed at a closed loopback proxy so that no test run
leaves the machine. Without Chromium the tests skip, except in CI (``CI=true``) where they fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import chromium_path

from tasks.report import build_report
from tests.unit.test_report import EVIL_CLASS, EVIL_FILE, make_fake_run

WIDTH, HEIGHT = 1280, 4800
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--no-default-browser-check", "--no-pings",
    "--disable-domain-reliability", "--disable-breakpad", "--hide-scrollbars",
    # Nothing leaves the machine: no name resolves and every HTTP goes to a closed local port.
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
    "--enable-logging=stderr", "--v=0",
]
# Colours the report's plots draw with (matplotlib lines, sample boxes), RGB.
PLOT_BLUE, PLOT_RED, OTHER_GREEN = (29, 114, 243), (230, 57, 70), (42, 157, 143)


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_path()


def run_chromium(binary: str, page: Path, work: Path, *action: str) -> tuple[str, list[dict]]:
    """Open ``page`` once; returns (stderr, URL requests from the net log)."""
    work.mkdir(parents=True, exist_ok=True)
    net_log = work / "net.json"
    proc = subprocess.run(
        [binary, *FLAGS, f"--user-data-dir={work / 'profile'}", f"--log-net-log={net_log}", *action,
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads(net_log.read_text())
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    requests = [e["params"] for e in log["events"]
                if types.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in e.get("params", {})]
    return proc.stdout + proc.stderr, requests


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def page_requests(requests: list[dict]) -> list[str]:
    """Requests the page made (Chromium's own services have no origin as initiator)."""
    return [r["url"] for r in requests if r.get("initiator") != "not an origin"]


def near(pixels: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> int:
    """How many pixels are within ``tol`` (sum of channel differences) of ``colour``."""
    return int((np.abs(pixels - np.array(colour)).sum(axis=1) <= tol).sum())


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_fake_run(tmp_path_factory.mktemp("browser"))
    build_report(run, run / "report", previous={"DetectionBoxes_Precision/mAP@.50IOU": 0.4},
                 gate={"promoted": True, "reason": "beats the last promoted run"})
    return run / "report" / "report.html"


def test_report_renders_charts_without_console_errors_or_requests(
        chromium: str, report: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    stderr, requests = run_chromium(chromium, report, tmp_path / "shot", f"--screenshot={shot}",
                                    f"--window-size={WIDTH},{HEIGHT}")
    assert console_lines(stderr) == []
    assert page_requests(requests) == []

    assert shot.stat().st_size > 100_000
    with Image.open(shot) as im:
        assert im.size == (WIDTH, HEIGHT)
        pixels = np.asarray(im.convert("RGB"), dtype=np.int32).reshape(-1, 3)
    packed = (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]
    assert len(np.unique(packed)) > 2000  # photos and charts, not a blank page
    # The loss and PR curves (blue/red lines) and the sample boxes (class colours) are on screen.
    assert near(pixels, PLOT_BLUE) > 2000
    assert near(pixels, PLOT_RED) > 1000
    assert near(pixels, OTHER_GREEN) > 300
    shutil.copy(shot, report.parent / "screenshot.png")  # kept for a look by eye

    stderr, requests = run_chromium(chromium, report, tmp_path / "dom", "--dump-dom")
    assert console_lines(stderr) == [] and page_requests(requests) == []
    dom = stderr  # --dump-dom writes the DOM to stdout, returned with stderr
    imgs = re.findall(r"<img [^>]*>", dom)
    assert len(imgs) == 3 and all('src="data:image/png;base64,' in i for i in imgs)
    assert "<script" not in dom.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and EVIL_CLASS not in dom
    assert "a\"&lt;&gt;&amp;.jpg" in dom  # a text node: quotes stay, markup is escaped
    assert EVIL_FILE not in dom


def test_the_checks_catch_an_external_resource(chromium: str, report: Path, tmp_path: Path) -> None:
    """Controls: the same page with an external image is caught by the console check (the page's
    security policy refuses it) and, without the policy, by the request check."""
    page = report.read_text()
    bad = tmp_path / "with_csp.html"
    bad.write_text(page.replace("</main>", '<img src="http://example.invalid/x.png"></main>'))
    stderr, requests = run_chromium(chromium, bad, tmp_path / "a", "--dump-dom")
    assert any("example.invalid" in line for line in console_lines(stderr))

    no_csp = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", bad.read_text())
    assert no_csp != bad.read_text()
    bad2 = tmp_path / "without_csp.html"
    bad2.write_text(no_csp)
    stderr, requests = run_chromium(chromium, bad2, tmp_path / "b", "--dump-dom")
    assert page_requests(requests) == ["http://example.invalid/x.png"]
