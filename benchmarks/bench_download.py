"""Download stage throughput on the 112 real images, packed in the production archive layout.

Prints figures (no assertions): hashing + safe extraction of a local archive, a re-run that
reuses the recorded hash, an HTTP download over loopback (clean, and cut halfway then resumed
by the next attempt), and an S3 download from a moto server on loopback; then the same rates
applied to the production archive (about 750 MB). Run: ``.venv/bin/python benchmarks/bench_download.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.download import download_dataset
from tasks.errors import PersoncarError

SHARED = Path(os.environ.get("PERSONCAR_SHARED_DATA", REPO.parent / "shared" / "data" / "personcar"))
PRODUCTION_BYTES = 750e6


def build_archive(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tf:
        tf.add(SHARED / "images", arcname="trainval/images")
        tf.add(SHARED / "bbox-annotations.sample112.json", arcname="trainval/annotations/bbox-annotations.json")


def serve(data: bytes, drop_first: bool) -> tuple[ThreadingHTTPServer, str]:
    state = {"drop": drop_first}

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            start = 0
            rng = self.headers.get("Range")
            if rng:
                start = int(rng.split("=")[1].split("-")[0])
            body = data[start:]
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"bench"')
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if state["drop"]:
                state["drop"] = False
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/trainval.tar.gz"


def resumed(attempt):
    """Two attempts, as Airflow's task retries make them: the first is cut, the second resumes."""
    with contextlib.suppress(PersoncarError):
        attempt()
    return attempt()


def timed(label: str, size: int, fn) -> float:
    t = time.perf_counter()
    m = fn()
    dt = time.perf_counter() - t
    print(f"{label:<46} {dt:6.2f} s  {size / dt / 1e6:7.1f} MB/s  "
          f"-> {PRODUCTION_BYTES / (size / dt) :6.1f} s for 750 MB  (reused_cache={m['reused_cache']})")
    return dt


def main() -> None:
    if not (SHARED / "images").is_dir():
        sys.exit(f"real data not found at {SHARED} (set PERSONCAR_SHARED_DATA)")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        archive = tmp / "trainval.tar.gz"
        build_archive(archive)
        data = archive.read_bytes()
        size, digest = len(data), hashlib.sha256(data).hexdigest()
        n = len(list((SHARED / "images").iterdir()))
        print(f"archive: {n} real images, {size / 1e6:.1f} MB compressed; cpu cores: {os.cpu_count()}")
        common = {"sha256": digest, "progress_every": 3600}

        timed("local path: hash + extract", size,
              lambda: download_dataset(str(archive), tmp / "d1", cache_dir=tmp / "c1", **common))
        timed("local path re-run: recorded hash + extract", size,
              lambda: download_dataset(str(archive), tmp / "d1", cache_dir=tmp / "c1", **common))

        httpd, url = serve(data, drop_first=False)
        timed("http loopback: download + extract", size,
              lambda: download_dataset(url, tmp / "d2", cache_dir=tmp / "c2", **common))
        timed("http re-run: cached archive + extract", size,
              lambda: download_dataset(url, tmp / "d2", cache_dir=tmp / "c2", **common))
        httpd.shutdown()
        httpd, url = serve(data, drop_first=True)
        timed("http loopback, cut at 50%, next attempt resumes", size,
              lambda: resumed(lambda: download_dataset(url, tmp / "d3", cache_dir=tmp / "c3", **common)))
        httpd.shutdown()

        from moto.server import ThreadedMotoServer
        import boto3

        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench-bucket")
        s3.upload_fileobj(io.BytesIO(data), "bench-bucket", "trainval.tar.gz")
        timed("s3 (moto, loopback): download + extract", size,
              lambda: download_dataset("s3://bench-bucket/trainval.tar.gz", tmp / "d4", cache_dir=tmp / "c4",
                                       endpoint_url=endpoint, **common))
        server.stop()


if __name__ == "__main__":
    main()
