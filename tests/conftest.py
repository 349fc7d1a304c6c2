"""Shared fixtures: the real reference data beside the checkout and real local services."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
