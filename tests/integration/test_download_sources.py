"""Downloads from real endpoints on loopback: a moto S3 server and HTTP servers started here.

Covers credentialed and anonymous S3 reads, wrong checksums, missing keys and buckets, resumable
HTTP (a server that drops the connection midway, one that ignores Range, a run interrupted and
resumed by the next run), failed attempts that end cleanly for Airflow's retries to take over,
cache reuse, and file:// / plain path sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import socket
import tarfile
import threading
import time
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import numpy as np
import pytest
from botocore.exceptions import EndpointConnectionError
from PIL import Image

from tasks import download as dl
from tasks.download import MANIFEST_NAME, download_dataset
from tasks.errors import PersoncarError, TemporaryError
from tests.conftest import coco_doc, free_port

N_IMAGES = 4
FAST = {"progress_every": 3600}


# ----------------------------------------------------------------------------- a small real archive

def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)  # noise: incompressible, so the archive has some size to cut
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def build_archive(n: int = N_IMAGES, tag: str = "") -> bytes:
    coco = coco_doc(n, (128, 96), [4, 4, 20, 30], tag=tag)
    files = [(f"trainval/images/image_{i + 1:09d}.jpg", _jpeg(i)) for i in range(n)]
    files.append(("trainval/annotations/bbox-annotations.json", json.dumps(coco).encode()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for d in ("trainval", "trainval/images", "trainval/annotations"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
        for name, data in files:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def archive() -> bytes:
    data = build_archive()
    assert len(data) > 20_000
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_extracted(dest: Path, data: bytes, manifest: dict) -> None:
    assert manifest["sha256"] == sha(data)
    assert manifest["size_bytes"] == len(data)
    assert manifest["images"] == N_IMAGES
    assert json.loads((dest / MANIFEST_NAME).read_text()) == manifest
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            if m.isfile():
                assert (dest / m.name).read_bytes() == tf.extractfile(m).read()


def cache_files(cache: Path) -> list[str]:
    """What the cache holds besides its lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


# ----------------------------------------------------------------------------- a real HTTP server

class FileServer:
    """HTTP/1.1 on 127.0.0.1 serving one archive, with Range/If-Range, and faults on demand."""

    path = "/data/trainval.tar.gz"

    def __init__(self, data: bytes):
        self.data, self.etag = data, '"v1"'
        self.requests: list[dict[str, str]] = []
        self.drop_next = 0            # responses to cut after half their body
        self.fail_next: list[int] = []  # statuses to answer before serving
        self.honour_range = True
        self.auth: str | None = None
        self.body_bytes_sent = 0
        self.delay_s = 0.0            # pause before sending a body
        self.request_seen = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.base + self.path

    def set_data(self, data: bytes, etag: str) -> None:
        self.data, self.etag = data, etag

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _reply(self, h: BaseHTTPRequestHandler, status: int, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append({k.lower(): v for k, v in h.headers.items()})
        self.request_seen.set()
        if self.auth and h.headers.get("Authorization") != self.auth:
            return self._reply(h, 401, {"WWW-Authenticate": 'Basic realm="data"'})
        if urlsplit(h.path).path != self.path:
            return self._reply(h, 404)
        if self.fail_next:
            return self._reply(h, self.fail_next.pop(0))
        data = self.data
        start, end, status = 0, len(data) - 1, 200
        rng, if_range = h.headers.get("Range"), h.headers.get("If-Range")
        if rng and self.honour_range and (if_range is None or if_range == self.etag):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            assert m, rng
            start = int(m[1])
            end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                return self._reply(h, 416, {"Content-Range": f"bytes */{len(data)}"})
            status = 206
        body = data[start:end + 1]
        h.send_response(status)
        h.send_header("Content-Type", "application/gzip")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", self.etag)
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.drop_next and len(body) > 1:
            self.drop_next -= 1
            half = len(body) // 2
            h.wfile.write(body[:half])
            h.wfile.flush()
            self.body_bytes_sent += half
            h.close_connection = True  # the server closes the socket: the client sees EOF midway
            return
        h.wfile.write(body)
        self.body_bytes_sent += len(body)

    def data_requests(self) -> list[dict[str, str]]:
        return [r for r in self.requests if r.get("range") != "bytes=0-0"]


@pytest.fixture()
def http_server(archive: bytes) -> Iterator[FileServer]:
    server = FileServer(archive)
    yield server
    server.close()


@pytest.fixture()
def ws(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "out" / "dest", tmp_path / "cache"


# ----------------------------------------------------------------------------- HTTP

def test_http_drop_midway_fails_the_attempt_and_the_next_attempt_resumes(http_server, archive, ws, caplog,
                                                                         monkeypatch):
    dest, cache = ws
    http_server.drop_next = 1
    monkeypatch.setattr(dl, "CHUNK", 1024)  # many chunks: progress must still be rate limited
    caplog.set_level(logging.INFO, logger="personcar")
    half = len(archive) // 2
    # a retry may pass: a TemporaryError (exit 75), which the DAG task retries
    with pytest.raises(TemporaryError, match=rf"connection closed after {half} of {len(archive)} bytes"):
        download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    assert len(http_server.requests) == 1  # no retry inside the attempt: Airflow's task retries own that
    assert not dest.exists()
    caplog.clear()
    m = download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)  # the next attempt
    assert_extracted(dest, archive, m)
    assert m["reused_cache"] is False and m["source"] == http_server.url
    first, second = http_server.requests
    assert "range" not in first
    assert second["range"] == f"bytes={half}-"  # resumed exactly where the drop happened
    assert second["if-range"] == '"v1"'
    assert http_server.body_bytes_sent == len(archive)  # nothing fetched twice
    assert f"resuming at byte {half}" in caplog.text
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloading")]
    assert len(progress) == 1 and "(100.0%)" in progress[0] and "MB/s" in progress[0]
    assert not [p for p in cache.iterdir() if p.name.endswith((".part", ".part.json"))]


def test_http_server_that_ignores_range_restarts_from_zero(http_server, archive, ws, caplog):
    dest, cache = ws
    http_server.drop_next, http_server.honour_range = 1, False
    caplog.set_level(logging.INFO, logger="personcar")
    with pytest.raises(PersoncarError, match=r"connection closed after"):
        download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    m = download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)  # the next attempt
    assert_extracted(dest, archive, m)
    assert len(http_server.requests) == 2 and http_server.requests[1]["range"].startswith("bytes=")
    assert "sent the whole object instead of bytes" in caplog.text


def test_interrupted_run_is_resumed_by_the_next_run(http_server, archive, ws):
    dest, cache = ws
    http_server.drop_next = 1
    with pytest.raises(PersoncarError) as ei:
        download_dataset(http_server.url, dest, cache_dir=cache, **FAST)
    half = len(archive) // 2
    assert f"connection closed after {half} of {len(archive)} bytes" in str(ei.value)
    assert f"{half} bytes kept in the cache, the next run resumes" in str(ei.value)
    assert not dest.exists() and not dest.parent.exists() or list(dest.parent.iterdir()) == []
    sent_before = http_server.body_bytes_sent

    m = download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    assert_extracted(dest, archive, m)
    assert http_server.requests[-1]["range"] == f"bytes={half}-"
    assert http_server.body_bytes_sent - sent_before == len(archive) - half


def test_partial_file_of_a_changed_object_is_not_stitched(http_server, archive, ws):
    dest, cache = ws
    http_server.drop_next = 1
    with pytest.raises(PersoncarError):
        download_dataset(http_server.url, dest, cache_dir=cache, **FAST)
    new = build_archive(tag="v2")
    http_server.set_data(new, '"v2"')  # If-Range no longer matches: the server sends all of v2
    m = download_dataset(http_server.url, dest, cache_dir=cache, **FAST)
    assert m["sha256"] == sha(new)
    assert json.loads((dest / m["annotations_file"]).read_text())["tag"] == "v2"


def test_partial_file_of_a_resized_object_under_the_same_etag_is_not_stitched(http_server, archive, ws):
    dest, cache = ws
    http_server.drop_next = 1
    with pytest.raises(PersoncarError):
        download_dataset(http_server.url, dest, cache_dir=cache, **FAST)
    new = build_archive(n=N_IMAGES + 2, tag="v2")
    http_server.set_data(new, '"v1"')  # the ETag did not change: If-Range cannot tell
    with pytest.raises(PersoncarError, match=rf"its size changed from {len(archive)} to {len(new)} bytes"):
        download_dataset(http_server.url, dest, cache_dir=cache, **FAST)
    assert not dest.exists() and not [p for p in cache.iterdir() if ".part" in p.name]
    m = download_dataset(http_server.url, dest, cache_dir=cache, **FAST)  # the next attempt starts again
    assert m["sha256"] == sha(new) and m["images"] == N_IMAGES + 2


def test_http_transient_errors_fail_each_attempt_cleanly_until_one_succeeds(http_server, archive, ws):
    dest, cache = ws
    http_server.fail_next = [503, 502]
    for status, reason in ((503, "Service Unavailable"), (502, "Bad Gateway")):  # Airflow's retries, in effect
        with pytest.raises(PersoncarError) as ei:
            download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)
        assert str(ei.value) == f"cannot download {http_server.url}: HTTP {status} {reason}"
        assert isinstance(ei.value.__cause__, urllib.error.HTTPError)  # the cause stays for the task log
        assert not dest.exists() and cache_files(cache) == []
    m = download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    assert_extracted(dest, archive, m)
    assert len(http_server.requests) == 3


def test_http_errors_say_whether_a_retry_may_pass(http_server, ws, tmp_path):
    """The archive download and the checkpoint download share one rule (``tasks.fetch.http_retryable``):
    a timeout, throttling or 5xx is a TemporaryError (the CLI exits 75, a trainer pod is retried), any
    other error status is final (exit 2)."""
    from tasks.checkpoints import _download_http

    dest, cache = ws
    ckpt = tmp_path / "ckpt.tar.gz"
    for status, temporary in ((503, True), (429, True), (408, True), (404, False), (403, False)):
        http_server.fail_next = [status, status]
        with pytest.raises(PersoncarError) as archive_error:
            download_dataset(http_server.url, dest, cache_dir=cache, **FAST)
        with pytest.raises(PersoncarError, match=rf"^cannot download checkpoint {http_server.url}: HTTP Error {status}"
                           ) as ckpt_error:
            _download_http(http_server.url, ckpt)
        for error in (archive_error.value, ckpt_error.value):
            assert isinstance(error, TemporaryError) is temporary, (status, error)
            assert error.exit_code == (75 if temporary else 2) and isinstance(error.__cause__, urllib.error.HTTPError)
        assert not dest.exists() and not ckpt.exists() and not ckpt.with_name(ckpt.name + ".part").exists()


def test_http_attempt_makes_one_request_and_no_retries_of_its_own(http_server, ws, caplog):
    dest, cache = ws
    http_server.fail_next = [503] * 10
    caplog.set_level(logging.INFO, logger="personcar")
    with pytest.raises(PersoncarError, match=r"^cannot download .*: HTTP 503 Service Unavailable$"):
        download_dataset(http_server.url, dest, cache_dir=cache, **FAST)
    assert len(http_server.requests) == 1
    assert "retry" not in caplog.text
    assert not dest.exists()


def test_http_not_found_is_not_retried(http_server, ws):
    dest, cache = ws
    with pytest.raises(PersoncarError, match=r"cannot download .*/data/missing\.tar\.gz: HTTP 404"):
        download_dataset(http_server.base + "/data/missing.tar.gz", dest, cache_dir=cache, **FAST)
    assert len(http_server.requests) == 1


def test_http_connection_refused(ws):
    dest, cache = ws
    port = free_port()  # a port nobody listens on
    with pytest.raises(PersoncarError, match=rf"^cannot download http://127\.0\.0\.1:{port}/trainval\.tar\.gz: "
                                             r".*Connection refused$") as ei:
        download_dataset(f"http://127.0.0.1:{port}/trainval.tar.gz", dest, cache_dir=cache, **FAST)
    assert isinstance(ei.value.__cause__, urllib.error.URLError)
    assert not dest.exists()


def test_http_wrong_checksum_deletes_the_download(http_server, archive, ws):
    dest, cache = ws
    wrong = "0" * 64
    with pytest.raises(PersoncarError) as ei:
        download_dataset(http_server.url, dest, sha256=wrong, cache_dir=cache, **FAST)
    assert str(ei.value) == (f"sha256 mismatch for {http_server.url}: expected {wrong}, got {sha(archive)} "
                             f"({len(archive)} bytes); the downloaded file was deleted")
    assert cache_files(cache) == [] and not dest.exists()


def test_http_cache_reuse(http_server, archive, ws, caplog):
    dest, cache = ws
    caplog.set_level(logging.INFO, logger="personcar")
    first = download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    assert first["reused_cache"] is False and len(http_server.requests) == 1

    # same source and checksum: no request at all
    second = download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    assert second["reused_cache"] is True and len(http_server.requests) == 1
    assert "reusing the verified cached archive" in caplog.text
    assert {k: v for k, v in second.items() if k not in ("seconds", "reused_cache")} == \
        {k: v for k, v in first.items() if k not in ("seconds", "reused_cache")}

    # no checksum: one 1-byte probe, and the unchanged object is reused
    third = download_dataset(http_server.url, dest, cache_dir=cache, **FAST)
    assert third["reused_cache"] is True
    assert http_server.requests[-1]["range"] == "bytes=0-0" and len(http_server.requests) == 2

    # the object changed at the source: fetched again
    new = build_archive(tag="v2")
    http_server.set_data(new, '"v2"')
    fourth = download_dataset(http_server.url, dest, cache_dir=cache, **FAST)
    assert fourth["reused_cache"] is False and fourth["sha256"] == sha(new)
    assert json.loads((dest / fourth["annotations_file"]).read_text())["tag"] == "v2"
    # and a checksum that differs from the cached archive's forces a fetch too
    http_server.set_data(archive, '"v1"')
    fifth = download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    assert fifth["reused_cache"] is False and fifth["sha256"] == sha(archive)


def test_unreachable_source_falls_back_to_the_cached_archive(archive, ws, caplog):
    dest, cache = ws
    server = FileServer(archive)
    url = server.url
    download_dataset(url, dest, cache_dir=cache, **FAST)
    server.close()  # offline now: the change check cannot run
    caplog.set_level(logging.WARNING, logger="personcar")
    m = download_dataset(url, dest, cache_dir=cache, **FAST)
    assert m["reused_cache"] is True and m["sha256"] == sha(archive)
    assert "cannot check" in caplog.text and "reusing the cached archive" in caplog.text


def test_cached_archive_modified_on_disk_is_fetched_again(http_server, archive, ws):
    dest, cache = ws
    download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    (cached,) = [p for p in cache.iterdir() if p.name.endswith(".tar.gz")]
    cached.write_bytes(cached.read_bytes()[:-10] + b"\0" * 10)  # bit rot / tampering
    m = download_dataset(http_server.url, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    assert m["reused_cache"] is False and len(http_server.requests) == 2
    assert cached.read_bytes() == archive


def test_http_basic_auth_from_the_url_is_sent_and_redacted(http_server, archive, ws):
    import base64

    dest, cache = ws
    http_server.auth = "Basic " + base64.b64encode(b"reader:s3cret").decode()
    url = http_server.url.replace("http://", "http://reader:s3cret@")
    m = download_dataset(url, dest, cache_dir=cache, **FAST)
    assert_extracted(dest, archive, m)
    assert "s3cret" not in m["source"] and m["source"].startswith("http://reader:***@127.0.0.1:")
    assert "s3cret" not in (dest / MANIFEST_NAME).read_text()
    assert not any("s3cret" in p.read_text() for p in cache.iterdir() if p.suffix == ".json")


def test_signed_url_secrets_stay_out_of_the_manifest_and_a_re_signed_url_reuses_the_cache(http_server, archive, ws):
    dest, cache = ws
    url1 = http_server.url + "?X-Amz-Credential=AKIAEXAMPLE%2Fus&X-Amz-Signature=abc123&version=7"
    m = download_dataset(url1, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    assert_extracted(dest, archive, m)
    assert "abc123" not in m["source"] and "AKIAEXAMPLE" not in m["source"]
    assert "X-Amz-Signature=***" in m["source"] and "version=7" in m["source"]
    url2 = url1.replace("abc123", "def456")  # the same object, signed again later
    again = download_dataset(url2, dest, sha256=sha(archive), cache_dir=cache, **FAST)
    assert again["reused_cache"] is True and len(http_server.requests) == 1


def test_concurrent_runs_of_the_same_source_download_once(http_server, archive, tmp_path, caplog):
    cache = tmp_path / "cache"
    http_server.delay_s = 0.5
    caplog.set_level(logging.INFO, logger="personcar")
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            results[name] = download_dataset(http_server.url, tmp_path / name, sha256=sha(archive),
                                             cache_dir=cache, **FAST)
        except BaseException as e:  # surfaced below
            errors.append(e)

    first = threading.Thread(target=run, args=("a",))
    first.start()
    assert http_server.request_seen.wait(10)  # a is downloading (and holds the cache entry)
    second = threading.Thread(target=run, args=("b",))
    second.start()
    first.join(30)
    second.join(30)
    assert not errors
    assert len(http_server.requests) == 1  # b waited, then reused a's verified archive
    assert results["a"]["reused_cache"] is False and results["b"]["reused_cache"] is True
    assert "waiting for another download of" in caplog.text
    assert_extracted(tmp_path / "b", archive, results["b"])


# ----------------------------------------------------------------------------- S3 (moto server)

@pytest.fixture()
def s3(s3_bucket):
    endpoint, bucket = s3_bucket
    return endpoint, bucket, boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture()
def no_aws_credentials(monkeypatch, tmp_path):
    """No credentials anywhere boto3 looks (and no instance-metadata lookup off the machine)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_s3_credentialed_read_and_cache_reuse(s3, archive, ws, caplog):
    endpoint, bucket, client = s3
    dest, cache = ws
    client.put_object(Bucket=bucket, Key="ml/trainval.tar.gz", Body=archive)
    caplog.set_level(logging.INFO, logger="personcar")
    src = f"s3://{bucket}/ml/trainval.tar.gz"
    m = download_dataset(src, dest, sha256=sha(archive), endpoint_url=endpoint, cache_dir=cache, **FAST)
    assert_extracted(dest, archive, m)
    assert m["source"] == src and m["archive_name"] == "trainval.tar.gz" and m["reused_cache"] is False
    assert "signed (credentials from env)" in caplog.text

    client.delete_object(Bucket=bucket, Key="ml/trainval.tar.gz")  # a fetch would now fail
    again = download_dataset(src, dest, sha256=sha(archive), endpoint_url=endpoint, cache_dir=cache, **FAST)
    assert again["reused_cache"] is True and again["sha256"] == sha(archive)
    assert_extracted(dest, archive, again)


def test_s3_without_checksum_refetches_a_changed_object(s3, archive, ws):
    endpoint, bucket, client = s3
    dest, cache = ws
    client.put_object(Bucket=bucket, Key="trainval.tar.gz", Body=archive)
    src = f"s3://{bucket}/trainval.tar.gz"
    assert download_dataset(src, dest, endpoint_url=endpoint, cache_dir=cache, **FAST)["reused_cache"] is False
    assert download_dataset(src, dest, endpoint_url=endpoint, cache_dir=cache, **FAST)["reused_cache"] is True
    new = build_archive(tag="v2")
    client.put_object(Bucket=bucket, Key="trainval.tar.gz", Body=new)
    m = download_dataset(src, dest, endpoint_url=endpoint, cache_dir=cache, **FAST)
    assert m["reused_cache"] is False and m["sha256"] == sha(new)


def test_s3_anonymous_read_of_a_public_object(s3, archive, ws, no_aws_credentials, caplog):
    endpoint, bucket, client = s3  # the client was made before the credentials were removed
    dest, cache = ws
    client.put_object(Bucket=bucket, Key="public/trainval.tar.gz", Body=archive, ACL="public-read")
    client.put_object(Bucket=bucket, Key="private/trainval.tar.gz", Body=archive)
    caplog.set_level(logging.INFO, logger="personcar")
    m = download_dataset(f"s3://{bucket}/public/trainval.tar.gz", dest, sha256=sha(archive),
                         endpoint_url=endpoint, cache_dir=cache, **FAST)
    assert_extracted(dest, archive, m)
    assert "anonymous (unsigned requests)" in caplog.text

    # the same unsigned request for a private object is refused, with a hint
    with pytest.raises(PersoncarError, match=r"access denied to s3://.*/private/trainval\.tar\.gz with an "
                                             r"anonymous \(unsigned\) request; give credentials"):
        download_dataset(f"s3://{bucket}/private/trainval.tar.gz", dest, endpoint_url=endpoint,
                         cache_dir=cache, **FAST)
    assert_extracted(dest, archive, m)  # the earlier good extraction is intact

    # explicit credentials (what the DAG passes from an Airflow connection) sign the request
    m2 = download_dataset(f"s3://{bucket}/private/trainval.tar.gz", dest, endpoint_url=endpoint,
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1", cache_dir=cache, **FAST)
    assert m2["sha256"] == sha(archive)
    assert "signed (credentials from explicit)" in caplog.text


def test_s3_anonymous_false_without_credentials(s3, ws, no_aws_credentials):
    endpoint, bucket, _ = s3
    dest, cache = ws
    with pytest.raises(PersoncarError, match=r"no AWS credentials found .* anonymous access is disabled"):
        download_dataset(f"s3://{bucket}/x.tar.gz", dest, anonymous=False, endpoint_url=endpoint, cache_dir=cache)


def test_s3_wrong_checksum(s3, archive, ws):
    endpoint, bucket, client = s3
    dest, cache = ws
    client.put_object(Bucket=bucket, Key="trainval.tar.gz", Body=archive)
    wrong = "f" * 64
    with pytest.raises(PersoncarError) as ei:
        download_dataset(f"s3://{bucket}/trainval.tar.gz", dest, sha256=wrong, endpoint_url=endpoint,
                         cache_dir=cache, **FAST)
    assert f"sha256 mismatch for s3://{bucket}/trainval.tar.gz: expected {wrong}, got {sha(archive)}" in str(ei.value)
    assert cache_files(cache) == [] and not dest.exists()


def test_s3_missing_key(s3, ws):
    endpoint, bucket, _ = s3
    dest, cache = ws
    with pytest.raises(PersoncarError) as ei:
        download_dataset(f"s3://{bucket}/nope/trainval.tar.gz", dest, endpoint_url=endpoint, cache_dir=cache, **FAST)
    assert str(ei.value) == (f"cannot download s3://{bucket}/nope/trainval.tar.gz: no object "
                             f"'nope/trainval.tar.gz' in bucket '{bucket}'")
    assert not dest.exists()


def test_s3_missing_bucket(s3, ws):
    endpoint, _, _ = s3
    dest, cache = ws
    with pytest.raises(PersoncarError) as ei:
        download_dataset("s3://personcar-no-such-bucket/trainval.tar.gz", dest, endpoint_url=endpoint,
                         cache_dir=cache, **FAST)
    assert str(ei.value) == ("cannot download s3://personcar-no-such-bucket/trainval.tar.gz: "
                             "bucket 'personcar-no-such-bucket' does not exist")


def test_s3_endpoint_unreachable(ws):
    dest, cache = ws
    port = free_port()  # nothing listens there
    with pytest.raises(PersoncarError, match=r"^cannot download s3://bkt-x/trainval\.tar\.gz: .*Could not connect "
                                             r"to the endpoint URL") as ei:
        download_dataset("s3://bkt-x/trainval.tar.gz", dest, endpoint_url=f"http://127.0.0.1:{port}",
                         anonymous=True, cache_dir=cache, **FAST)
    assert isinstance(ei.value.__cause__, EndpointConnectionError)  # the cause stays for the task log
    assert "\n" not in str(ei.value) and not dest.exists()


class DroppingProxy:
    """A TCP proxy to the moto server that cuts its first connection after ``drop_after`` bytes."""

    def __init__(self, upstream: str, drop_after: int):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.drop_after, self.drops_left = drop_after, 1
        self.requests: list[bytearray] = []  # what each client connection sent
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        up = socket.create_connection(self.upstream)
        with self.lock:
            drop = self.drops_left > 0
            self.drops_left -= drop
            sent_by_client = bytearray()
            self.requests.append(sent_by_client)

        def pump_up() -> None:
            try:
                while data := conn.recv(65536):
                    sent_by_client.extend(data)
                    up.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while data := up.recv(65536):
                if drop and sent + len(data) > self.drop_after:
                    conn.sendall(data[: self.drop_after - sent])
                    break
                conn.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (conn, up):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def ranges(self) -> list[str]:
        text = b"".join(self.requests).decode("latin-1")
        return re.findall(r"(?im)^range: (bytes=\d+-\d*)\r$", text)

    def close(self) -> None:
        self.sock.close()


def test_s3_download_resumes_after_the_connection_drops(s3, archive, ws, caplog):
    endpoint, bucket, client = s3
    dest, cache = ws
    client.put_object(Bucket=bucket, Key="trainval.tar.gz", Body=archive)
    proxy = DroppingProxy(endpoint, drop_after=len(archive) // 2)
    caplog.set_level(logging.INFO, logger="personcar")
    try:
        with pytest.raises(PersoncarError, match=r"bytes kept in the cache, the next run resumes$"):
            download_dataset(f"s3://{bucket}/trainval.tar.gz", dest, sha256=sha(archive),
                             endpoint_url=proxy.endpoint, cache_dir=cache, **FAST)
        assert not dest.exists() and len(proxy.requests) == 1  # one request: no retry inside the attempt
        m = download_dataset(f"s3://{bucket}/trainval.tar.gz", dest, sha256=sha(archive),
                             endpoint_url=proxy.endpoint, cache_dir=cache, **FAST)  # the next attempt
    finally:
        proxy.close()
    assert_extracted(dest, archive, m)
    (resumed,) = proxy.ranges()
    start = int(resumed.split("=")[1].rstrip("-"))
    assert 0 < start < len(archive) // 2  # response headers took part of the first connection's bytes
    assert "download of s3://" in caplog.text and f"resuming at byte {start}" in caplog.text
    text = b"".join(proxy.requests).decode("latin-1").lower()
    assert "if-match: " in text  # the resumed range is tied to the object version


def test_s3_partial_download_of_a_replaced_object_starts_again(s3, archive, ws, caplog):
    endpoint, bucket, client = s3
    dest, cache = ws
    client.put_object(Bucket=bucket, Key="trainval.tar.gz", Body=archive)
    proxy = DroppingProxy(endpoint, drop_after=len(archive) // 2)
    try:
        with pytest.raises(PersoncarError, match=r"bytes kept in the cache, the next run resumes"):
            download_dataset(f"s3://{bucket}/trainval.tar.gz", dest, endpoint_url=proxy.endpoint,
                             cache_dir=cache, **FAST)
    finally:
        proxy.close()
    new = build_archive(tag="v2")
    client.put_object(Bucket=bucket, Key="trainval.tar.gz", Body=new)
    caplog.set_level(logging.INFO, logger="personcar")
    m = download_dataset(f"s3://{bucket}/trainval.tar.gz", dest, endpoint_url=endpoint, cache_dir=cache, **FAST)
    assert m["sha256"] == sha(new)  # If-Match failed: no v1 prefix stitched onto v2
    assert "changed since the partial download" in caplog.text


# ----------------------------------------------------------------------------- local sources

def test_file_uri_and_plain_path(archive, tmp_path):
    src = tmp_path / "in put" / "trainval.tar.gz"
    src.parent.mkdir()
    src.write_bytes(archive)
    cache = tmp_path / "cache"
    m1 = download_dataset(src.as_uri(), tmp_path / "a", sha256=sha(archive), cache_dir=cache)
    assert_extracted(tmp_path / "a", archive, m1)
    assert m1["source"] == src.as_uri()
    m2 = download_dataset(str(src), tmp_path / "b", sha256=sha(archive), cache_dir=cache)
    assert_extracted(tmp_path / "b", archive, m2)
    assert m2["source"] == str(src)
    assert m2["reused_cache"] is True  # file:// and the path name the same file: hashed once
    assert cache_files(cache) and all(p.endswith(".json") for p in cache_files(cache))  # no copy of the archive
