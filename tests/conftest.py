"""Shared fixtures: the real reference data beside the checkout and real local services."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Airflow is imported now, before any test: its first import reconfigures logging with dictConfig, which
# closes every handler then alive. TensorFlow's absl handler writes to the stream that was sys.stderr when it
# was imported, pytest's capture file; a first Airflow import later, under capfd, closed that file and every
# later test on the worker failed with "I/O operation on closed file".
import airflow  # noqa: F401
import hypothesis  # noqa: F401  (imported now: a first import at the session's end trips CPython 3.11's AST check)
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PERSONCAR_SHARED_DATA", REPO.parent / "shared" / "data" / "personcar"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data/personcar``: the real annotation file and 112 real images (read only)."""
    if not (SHARED_DATA / "bbox-annotations.full.json").is_file():
        pytest.fail(f"real reference data not found at {SHARED_DATA} (set PERSONCAR_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's server) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials moto accepts; never real ones."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


@pytest.fixture()
def s3_bucket(s3_server: str, s3_env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """A fresh bucket on the moto server; yields ``(endpoint_url, bucket)``."""
    import uuid

    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = f"personcar-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield s3_server, name


def coco_doc(n: int, size: tuple[int, int], bbox: list[float], **fields: Any) -> dict[str, Any]:
    """A dataset file shaped like the production one: ``n`` images of ``size`` (w, h) with one ``bbox``
    each, person and car in turn, ``area`` stored as a fraction of the image; ``fields`` go on top."""
    w, h = size
    return {
        "images": [{"file_name": f"image_{i + 1:09d}.jpg", "width": w, "height": h, "id": i, "license": 1}
                   for i in range(n)],
        "annotations": [{"category_id": 1 + i % 2, "image_id": i, "segmentation": [], "iscrowd": 0, "bbox": bbox,
                         "area": bbox[2] * bbox[3] / (w * h), "id": i, "license": 2} for i in range(n)],
        "categories": [{"id": 1, "name": "person", "supercategory": "none"},
                       {"id": 2, "name": "car", "supercategory": "none"}],
        "licenses": [],
        **fields,
    }


def pixel_area_copy(src: Path, dst: Path) -> Path:
    """The published JSON with areas in pixels and sorted annotations (what validation produces)."""
    import json

    coco = json.loads(src.read_text())
    for a in coco["annotations"]:
        a["area"] = float(a["bbox"][2] * a["bbox"][3])
    coco["annotations"].sort(key=lambda a: (a["image_id"], a["id"]))
    dst.write_text(json.dumps(coco))
    return dst


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 12-image generated sample: its root, archive, raw JSON, pixel-area JSON and images."""
    from tasks.sample import make_sample

    root = tmp_path_factory.mktemp("sample")
    make_sample(root / "data", images=12, seed=7, archive=root / "trainval.tar.gz")
    raw = root / "data" / "trainval" / "annotations" / "bbox-annotations.json"
    return {
        "root": root / "data",
        "archive": root / "trainval.tar.gz",
        "annotations": raw,
        "clean": pixel_area_copy(raw, root / "clean.json"),
        "images": root / "data" / "trainval" / "images",
    }


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything under root (files by content, links by target, folders by name), leaving out the
    ``skip`` subtrees; ``{}`` when root does not exist. What a refused command must leave unchanged."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """Run ``personcar ARGS`` in-process; the exit code and the one line the command printed on stderr."""
    from tasks.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("personcar ")]
    assert len(lines) <= 1, lines
    return rc, lines[0] if lines else ""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, *, timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition()`` until it returns something truthy (returned) or fail after ``timeout`` s.

    ``condition`` may raise ``OSError`` (a server not listening yet): that counts as not yet.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def strict_s3_server() -> Iterator[str]:
    """moto's S3 server in its own process with authentication on: unknown keys are refused.

    moto checks credentials only when ``INITIAL_NO_AUTH_ACTION_COUNT`` is set, a process-wide
    setting, so this server runs apart from the shared ``s3_server`` fixture.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def chromium_path() -> str:
    """Debian's headless Chromium: required in CI (the test fails), skipped elsewhere when absent."""
    import shutil

    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    msg = "headless Chromium not found (Debian: apt-get install chromium; `make test` installs it as root)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


#: Debian's Chromium under Playwright (``playwright install`` downloads are not used).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """pytest-playwright's ``browser``/``page`` fixtures launch Debian's Chromium (skip or CI failure without it)."""
    return {**browser_type_launch_args, "executable_path": chromium_path(), "args": CHROMIUM_ARGS}


#: modules that set the suite's pace, dealt to a worker first: the learning check trains for 8 to 13
#: minutes on one core. ``--dist=loadfile`` deals whole modules in collection order here
#: (``--no-loadscope-reorder`` in pyproject.toml; by default xdist deals the modules with most tests first)
FIRST = ("tests/model/test_learning.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0] not in FIRST)  # stable: the rest keep their order
