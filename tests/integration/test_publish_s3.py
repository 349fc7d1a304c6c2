"""tasks.publish against a real S3 HTTP server (moto) on loopback."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from tests.conftest import free_port
from tasks import publish as pub
from tasks.artifacts import safe_run_id
from tasks import storage
from tasks.errors import PersoncarError, TemporaryError

MAP50 = "DetectionBoxes_Precision/mAP@.50IOU"


def make_report(root: Path, map50: float, *, extra: dict[str, str] | None = None) -> Path:
    """A report folder as the report stage writes it (html, md, metrics.json, a PNG)."""
    root.mkdir(parents=True, exist_ok=True)
    metrics = {
        "DetectionBoxes_Precision/mAP": round(map50 * 0.5, 6),
        MAP50: map50,
        "DetectionBoxes_Precision/mAP@.75IOU": round(map50 * 0.3, 6),
        "DetectionBoxes_Recall/AR@100": 0.5,
    }
    (root / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (root / "report.html").write_text(f"<!doctype html><title>{root.name}</title><p>{map50}</p>",
                                      encoding="utf-8")
    (root / "report.md").write_text(f"# {root.name}\nmAP@.50IOU {map50}\n", encoding="utf-8")
    (root / "pr_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + root.name.encode())
    for name, text in (extra or {}).items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def keys_under(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return sorted(o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", []))


def get_json(client, bucket: str, key: str):
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.fixture()
def s3(s3_bucket):
    endpoint, bucket = s3_bucket
    return storage.s3_client(endpoint), bucket, endpoint


def test_publish_uploads_run_folder_with_content_types_and_index(s3, tmp_path):
    client, bucket, endpoint = s3
    src = make_report(tmp_path / "run1" / "report", 0.31)
    validation = tmp_path / "validation.json"
    validation.write_text('{"success": true}', encoding="utf-8")

    result = pub.publish(src, f"s3://{bucket}/published", run_id="manual__2026-01-01T00:00:00+00:00",
                         endpoint_url=endpoint, extra_files={"validation.json": validation})

    run = safe_run_id("manual__2026-01-01T00:00:00+00:00")
    assert run.startswith("manual__2026-01-01T00_00_00_00_00-")  # folder-safe, with a hash of the original id
    assert result["run_id"] == run
    assert result["uri"] == f"s3://{bucket}/published/{run}/"
    assert result["report_url"] == f"s3://{bucket}/published/{run}/report.html"
    assert result["promoted"] is True and result["previous_promoted_run"] is None
    assert result["files"] == ["metrics.json", "pr_curve.png", "report.html", "report.md", "validation.json"]
    assert keys_under(client, bucket, f"published/{run}") == result["files"]
    types = {k: client.head_object(Bucket=bucket, Key=f"published/{run}/{k}")["ContentType"]
             for k in result["files"]}
    assert types == {
        "metrics.json": "application/json",
        "pr_curve.png": "image/png",
        "report.html": "text/html; charset=utf-8",
        "report.md": "text/markdown; charset=utf-8",
        "validation.json": "application/json",
    }
    index = get_json(client, bucket, "published/runs.json")
    assert len(index) == 1
    entry = index[0]
    assert entry["run_id"] == run and entry["promoted"] is True
    assert entry["report"] == f"{run}/report.html"
    assert entry["metrics"] == {"mAP": 0.155, "mAP@.50IOU": 0.31, "mAP@.75IOU": 0.093}
    assert entry["published_at"].endswith("+00:00")
    assert pub.load_index(f"s3://{bucket}/published", endpoint_url=endpoint) == index


def test_publishing_the_same_run_twice_leaves_one_copy_and_one_entry(s3, tmp_path):
    client, bucket, endpoint = s3
    dest = f"s3://{bucket}/p"
    pub.publish(make_report(tmp_path / "a", 0.2), dest, run_id="other", endpoint_url=endpoint)
    src = make_report(tmp_path / "r", 0.3, extra={"old-plot.png": "x"})
    first = pub.publish(src, dest, run_id="r1", endpoint_url=endpoint)
    (src / "old-plot.png").unlink()
    (src / "report.md").write_text("# r1 again\n", encoding="utf-8")
    second = pub.publish(src, dest, run_id="r1", endpoint_url=endpoint)

    assert keys_under(client, bucket, "p/r1") == ["metrics.json", "pr_curve.png", "report.html", "report.md"]
    assert client.get_object(Bucket=bucket, Key="p/r1/report.md")["Body"].read() == b"# r1 again\n"
    index = get_json(client, bucket, "p/runs.json")
    assert [e["run_id"] for e in index] == ["other", "r1"]
    assert first["promoted"] is True and second["promoted"] is True
    assert second["previous_promoted_run"] == "other"


def test_an_earlier_promotion_still_uploading_cannot_land_files_after_a_later_one(s3, tmp_path, monkeypatch):
    """run1 is promoted and starts filling latest/; run2 beats it meanwhile. run1's upload is held
    until run2 finished (or 3 s): without one writer at a time, run1's files would land last,
    under run2's pointer."""
    client, bucket, endpoint = s3
    dest = f"s3://{bucket}/race"
    real_upload = storage.upload_files
    run2_done = threading.Event()

    def upload(files, uri, **kwargs):
        if uri.endswith("/latest") and threading.current_thread().name == "run1":
            run2_done.wait(timeout=3)
        return real_upload(files, uri, **kwargs)

    monkeypatch.setattr(storage, "upload_files", upload)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def work(name: str, value: float) -> None:
        try:
            results[name] = pub.publish(make_report(tmp_path / name, value), dest, run_id=name, endpoint_url=endpoint)
        except BaseException as exc:
            errors.append(exc)
        finally:
            if name == "run2":
                run2_done.set()

    run1 = threading.Thread(target=work, args=("run1", 0.3), name="run1")
    run1.start()
    while run1.is_alive() and "run1" not in {e["run_id"] for e in pub.load_index(dest, endpoint_url=endpoint)}:
        run1.join(timeout=0.02)
    run2 = threading.Thread(target=work, args=("run2", 0.5), name="run2")
    run2.start()
    run2.join(timeout=60)
    run1.join(timeout=60)
    assert not errors, errors
    assert results["run1"]["promoted"] is True and results["run2"]["promoted"] is True
    pointer = get_json(client, bucket, "race/latest/pointer.json")
    assert pointer["run_id"] == "run2"
    for rel, digest in pointer["files"].items():
        body = client.get_object(Bucket=bucket, Key=f"race/latest/{rel}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, rel
    assert keys_under(client, bucket, "race/latest") == sorted([*pointer["files"], "pointer.json"])
    assert ".latest.lock" not in keys_under(client, bucket, "race")  # released


def test_a_lease_excludes_waits_and_an_expired_one_is_taken_over(s3, caplog):
    from tasks.runs_index import s3_lease

    client, bucket, endpoint = s3
    uri = f"s3://{bucket}/lease/.latest.lock"
    inside: list[str] = []
    overlaps: list[str] = []

    def hold(name: str) -> None:
        with s3_lease(uri, owner=name, endpoint_url=endpoint):
            if inside:
                overlaps.append(name)
            inside.append(name)
            threading.Event().wait(0.2)
            inside.remove(name)

    threads = [threading.Thread(target=hold, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert overlaps == [] and keys_under(client, bucket, "lease") == []

    held_by = r"lease/.latest.lock: held by holder \d+ \w+ for more than 1 s"
    with (s3_lease(uri, owner="holder", endpoint_url=endpoint), pytest.raises(TemporaryError, match=held_by),
          s3_lease(uri, owner="waiter", wait_s=1, endpoint_url=endpoint)):
        pass
    client.put_object(Bucket=bucket, Key="lease/.latest.lock", Body=json.dumps(
        {"owner": "a publish that died", "expires_at": 0}).encode())
    with caplog.at_level("WARNING", logger="personcar"), s3_lease(uri, owner="next", wait_s=1, endpoint_url=endpoint):
        assert get_json(client, bucket, "lease/.latest.lock")["owner"].startswith("next ")
    assert "lease/.latest.lock: took over the expired lease of a publish that died" in caplog.text
    assert keys_under(client, bucket, "lease") == []


def test_concurrent_publishes_keep_every_index_entry(s3, tmp_path):
    client, bucket, endpoint = s3
    dest = f"s3://{bucket}/concurrent"
    n = 8
    values = [0.10, 0.35, 0.20, 0.40, 0.05, 0.38, 0.50, 0.45]
    srcs = [make_report(tmp_path / f"run{i}", values[i]) for i in range(n)]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = pub.publish(srcs[i], dest, run_id=f"run{i}", endpoint_url=endpoint)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    index = get_json(client, bucket, "concurrent/runs.json")
    assert sorted(e["run_id"] for e in index) == sorted(f"run{i}" for i in range(n))
    # Every gate decision was made against the index as it stood at write time: replaying the index
    # in order gives the same promoted flags.
    best = None
    for entry in index:
        value = entry["metrics"]["mAP@.50IOU"]
        expect = value > 0 if best is None else value > best
        assert entry["promoted"] is expect, entry
        assert results[int(entry["run_id"][3:])]["promoted"] is expect
        if expect:
            best = value
    pointer = get_json(client, bucket, "concurrent/latest/pointer.json")
    assert pointer["run_id"] == pub.last_promoted(index)["run_id"]
    for rel, digest in pointer["files"].items():
        body = client.get_object(Bucket=bucket, Key=f"concurrent/latest/{rel}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, rel


def test_quality_gate_promotion_and_latest_pointer(s3, tmp_path):
    client, bucket, endpoint = s3
    dest = f"s3://{bucket}/gate"
    gate = {"metric": MAP50, "margin": 0.01}

    r1 = pub.publish(make_report(tmp_path / "r1", 0.30, extra={"only-in-r1.txt": "x"}), dest,
                     run_id="r1", endpoint_url=endpoint, gate=gate)
    assert r1["promoted"] is True and r1["latest"] == f"{dest}/latest/"
    pointer = get_json(client, bucket, "gate/latest/pointer.json")
    assert pointer["run_id"] == "r1" and pointer["report"] == "latest/report.html"
    assert pointer["run_uri"] == f"{dest}/r1/"

    r2 = pub.publish(make_report(tmp_path / "r2", 0.25), dest, run_id="r2", endpoint_url=endpoint, gate=gate)
    assert r2["promoted"] is False and r2["latest"] is None
    assert r2["gate"]["baseline_run_id"] == "r1" and r2["gate"]["baseline_value"] == 0.30
    # Beats r1, but not by more than the margin.
    r3 = pub.publish(make_report(tmp_path / "r3", 0.305), dest, run_id="r3", endpoint_url=endpoint, gate=gate)
    assert r3["promoted"] is False
    assert get_json(client, bucket, "gate/latest/pointer.json")["run_id"] == "r1"
    assert b"0.3<" in client.get_object(Bucket=bucket, Key="gate/latest/report.html")["Body"].read()

    r4 = pub.publish(make_report(tmp_path / "r4", 0.42), dest, run_id="r4", endpoint_url=endpoint, gate=gate)
    assert r4["promoted"] is True and r4["previous_promoted_run"] == "r1"
    pointer = get_json(client, bucket, "gate/latest/pointer.json")
    assert pointer["run_id"] == "r4" and pointer["metrics"]["mAP@.50IOU"] == 0.42
    assert keys_under(client, bucket, "gate/latest") == sorted(
        ["metrics.json", "pointer.json", "pr_curve.png", "report.html", "report.md"])
    latest_html = client.get_object(Bucket=bucket, Key="gate/latest/report.html")["Body"].read()
    assert latest_html == (tmp_path / "r4" / "report.html").read_bytes()

    prev = pub.previous_run(dest, endpoint_url=endpoint)
    assert prev["run_id"] == "r4" and prev["metrics"]["mAP@.50IOU"] == 0.42
    assert pub.previous_run(dest, endpoint_url=endpoint, exclude="r4")["run_id"] == "r1"
    assert [e["promoted"] for e in pub.load_index(dest, endpoint_url=endpoint)] == [True, False, False, True]


def test_first_run_with_zero_metric_is_not_promoted(s3, tmp_path):
    client, bucket, endpoint = s3
    result = pub.publish(make_report(tmp_path / "z", 0.0), f"s3://{bucket}/z", run_id="z", endpoint_url=endpoint)
    assert result["promoted"] is False
    assert storage.read_bytes(f"s3://{bucket}/z/latest/pointer.json", endpoint_url=endpoint) is None
    assert pub.previous_run(f"s3://{bucket}/z", endpoint_url=endpoint) is None


def test_failed_latest_update_keeps_the_previous_pointer(s3, tmp_path, monkeypatch):
    client, bucket, endpoint = s3
    dest = f"s3://{bucket}/fail"
    pub.publish(make_report(tmp_path / "good", 0.3), dest, run_id="good", endpoint_url=endpoint)
    before = {k: client.get_object(Bucket=bucket, Key=f"fail/latest/{k}")["Body"].read()
              for k in keys_under(client, bucket, "fail/latest")}

    # Writes under latest/ fail after the first file (a half-done copy).
    fs = storage.location(dest, endpoint_url=endpoint).fs  # the (cached) filesystem publish writes with
    writes = []
    put_file = fs.put_file

    def fail_on_second_latest_write(lpath, rpath, *args, **kwargs):
        if "/latest/" in rpath:
            writes.append(rpath)
            if len(writes) >= 2:
                raise ConnectionResetError("simulated network failure")
        return put_file(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", fail_on_second_latest_write)
    with pytest.raises(storage.StorageError, match="simulated"):
        pub.publish(make_report(tmp_path / "better", 0.5), dest, run_id="better", endpoint_url=endpoint)
    monkeypatch.setattr(fs, "put_file", put_file)

    pointer = get_json(client, bucket, "fail/latest/pointer.json")
    assert pointer["run_id"] == "good"
    assert json.loads(before["pointer.json"]) == pointer
    # Readers trust pointer.json: its run folder is intact.
    for rel, digest in pointer["files"].items():
        body = client.get_object(Bucket=bucket, Key=f"fail/good/{rel}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest

    # Publishing again completes the promotion.
    again = pub.publish(tmp_path / "better", dest, run_id="better", endpoint_url=endpoint)
    assert again["promoted"] is True
    pointer = get_json(client, bucket, "fail/latest/pointer.json")
    assert pointer["run_id"] == "better"
    for rel, digest in pointer["files"].items():
        body = client.get_object(Bucket=bucket, Key=f"fail/latest/{rel}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest
    assert [e["run_id"] for e in pub.load_index(dest, endpoint_url=endpoint)] == ["good", "better"]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_missing_bucket_is_a_clear_error(s3_server, s3_env, tmp_path):
    with pytest.raises(PersoncarError) as err:
        pub.publish(make_report(tmp_path / "r", 0.3), "s3://personcar-missing-bucket/reports",
                    run_id="r1", endpoint_url=s3_server)
    msg = str(err.value)
    assert "\n" not in msg
    assert "s3://personcar-missing-bucket/reports/r1/" in msg and "does not exist" in msg
    with pytest.raises(PersoncarError, match="personcar-missing-bucket.*does not exist"):
        pub.load_index("s3://personcar-missing-bucket/reports", endpoint_url=s3_server)


def test_refused_credentials_are_a_clear_error(strict_s3_server, tmp_path, monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a process keeps its credentials; this test changes them
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREFUSED000000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(PersoncarError) as err:
        pub.publish(make_report(tmp_path / "r", 0.3), "s3://team-bucket/reports", run_id="r1",
                    endpoint_url=strict_s3_server)
    msg = str(err.value)
    assert "\n" not in msg and "s3://team-bucket/reports/" in msg
    assert "credentials refused" in msg and "InvalidAccessKeyId" in msg


def test_unreachable_endpoint_is_a_clear_error(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PersoncarError) as err:
        pub.previous_run("s3://team-bucket/reports", endpoint_url=dead)
    msg = str(err.value)
    assert "\n" not in msg and "s3://team-bucket/reports/runs.json" in msg and "unreachable" in msg


@pytest.fixture()
def no_conditional_writes_s3(s3_bucket):
    """An S3 endpoint that answers conditional PUTs with 501 NotImplemented (as some S3-compatible
    stores do) and forwards everything else to the moto server; yields ``(endpoint_url, bucket)``."""
    import http.client
    import urllib.parse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    upstream, bucket = s3_bucket
    target = urllib.parse.urlsplit(upstream)
    refused: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.command == "PUT" and ("If-None-Match" in self.headers or "If-Match" in self.headers):
                refused.append(self.path)
                error = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
                         b"<Message>A header you provided implies functionality that is not implemented</Message>"
                         b"</Error>")
                self.send_response(501)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(error)))
                self.end_headers()
                self.wfile.write(error)
                return
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            conn.request(self.command, self.path, body=body,
                         headers={k: v for k, v in self.headers.items() if k.lower() != "host"} | {
                             "Host": target.netloc})
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bucket, refused
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_without_conditional_writes_still_gets_every_run_indexed(no_conditional_writes_s3, tmp_path,
                                                                          caplog):
    endpoint, bucket, refused = no_conditional_writes_s3
    dest = f"s3://{bucket}/plain"
    with caplog.at_level("WARNING", logger="personcar"):
        for name, value in (("r1", 0.3), ("r2", 0.2), ("r3", 0.4)):
            pub.publish(make_report(tmp_path / name, value), dest, run_id=name, endpoint_url=endpoint)
    assert refused  # the conditional writes were tried and refused
    index = pub.load_index(dest, endpoint_url=endpoint)
    assert [(e["run_id"], e["promoted"]) for e in index] == [("r1", True), ("r2", False), ("r3", True)]
    assert pub.load_pointer(dest, endpoint_url=endpoint)["run_id"] == "r3"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("runs.json: the S3 server does not support conditional writes; falling back" in w for w in warnings)
    assert any(".latest.lock: the S3 server does not support conditional writes; no lease taken" in w
               for w in warnings)
    client = storage.s3_client(endpoint)
    assert ".latest.lock" not in keys_under(client, bucket, "plain")
