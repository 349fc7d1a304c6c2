"""tasks.storage against a real S3 HTTP server (moto) on loopback."""

from __future__ import annotations

import io
import os
import urllib.request
from pathlib import Path

import boto3
import pytest
from PIL import Image

from tasks import storage
from tasks.errors import PersoncarError
from tests.conftest import free_port


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


class CallCounter:
    """Counts the S3 API calls the storage layer's S3 client makes for ``uri``, by operation name."""

    def __init__(self, uri: str, endpoint: str):
        fs = storage.location(uri, endpoint_url=endpoint).fs  # fsspec caches it: the one the layer uses
        fs.ls(uri.removeprefix("s3://").split("/")[0])  # connects
        self.calls: dict[str, int] = {}
        fs.s3.meta.events.register("before-call.s3.*", self._count)

    def _count(self, model, **_):
        self.calls[model.name] = self.calls.get(model.name, 0) + 1

    def __getitem__(self, name: str) -> int:
        return self.calls.get(name, 0)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def report_tree(tmp_path: Path) -> Path:
    root = tmp_path / "report"
    (root / "plots").mkdir(parents=True)
    (root / "report.html").write_text("<!doctype html><title>r</title><p>ok</p>", encoding="utf-8")
    (root / "report.md").write_text("# report\n", encoding="utf-8")
    (root / "metrics.json").write_text('{"DetectionBoxes_Precision/mAP": 0.1}', encoding="utf-8")
    (root / "plots" / "pr_person.png").write_bytes(_png_bytes())
    (root / "notes.txt").write_text("plain", encoding="utf-8")
    (root / "blob.weird-ext").write_bytes(b"\x00\x01")
    return root


EXPECTED_TYPES = {
    "report.html": "text/html; charset=utf-8",
    "report.md": "text/markdown; charset=utf-8",
    "metrics.json": "application/json",
    "plots/pr_person.png": "image/png",
    "notes.txt": "text/plain; charset=utf-8",
    "blob.weird-ext": "application/octet-stream",
}


# --------------------------------------------------------------------------------------------------
# Upload / download
# --------------------------------------------------------------------------------------------------


def test_upload_dir_sets_content_types_and_bodies(s3_bucket, report_tree):
    endpoint, bucket = s3_bucket
    client = storage.s3_client(endpoint)
    uris = storage.upload_dir(report_tree, f"s3://{bucket}/runs/r1", endpoint_url=endpoint)

    assert uris == sorted(f"s3://{bucket}/runs/r1/{rel}" for rel in EXPECTED_TYPES)
    for rel, ctype in EXPECTED_TYPES.items():
        head = client.head_object(Bucket=bucket, Key=f"runs/r1/{rel}")
        assert head["ContentType"] == ctype, rel
        body = client.get_object(Bucket=bucket, Key=f"runs/r1/{rel}")["Body"].read()
        assert body == (report_tree / rel).read_bytes()


def test_upload_skips_unchanged_files_and_mirror_deletes_stale(s3_bucket, report_tree):
    endpoint, bucket = s3_bucket
    client = storage.s3_client(endpoint)
    dest = f"s3://{bucket}/ckpt"
    storage.upload_dir(report_tree, dest, endpoint_url=endpoint)

    counter = CallCounter(dest, endpoint)
    storage.upload_dir(report_tree, dest, endpoint_url=endpoint)
    assert counter["PutObject"] == 0, "unchanged files were sent again"

    (report_tree / "report.md").write_text("# report v2\n", encoding="utf-8")
    (report_tree / "notes.txt").unlink()
    storage.upload_dir(report_tree, dest, endpoint_url=endpoint, delete=True)
    assert counter["PutObject"] == 1
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="ckpt/")["Contents"])
    assert keys == sorted(f"ckpt/{rel}" for rel in EXPECTED_TYPES if rel != "notes.txt")
    body = client.get_object(Bucket=bucket, Key="ckpt/report.md")["Body"].read()
    assert body == b"# report v2\n"


def test_multipart_object_etag_is_predicted(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    client = storage.s3_client(endpoint)
    big = tmp_path / "ckpt" / "ckpt-1.data-00000-of-00001"
    big.parent.mkdir()
    big.write_bytes(os.urandom(2 * 50 * 2**20 + 12345))  # two of s3fs's 50 MiB parts, and a third
    storage.upload_dir(big.parent, f"s3://{bucket}/model", endpoint_url=endpoint)

    etag = client.head_object(Bucket=bucket, Key=f"model/{big.name}")["ETag"].strip('"')
    assert etag.endswith("-3"), etag
    assert storage.s3_etag(big) == etag
    counter = CallCounter(f"s3://{bucket}/model", endpoint)
    storage.upload_dir(big.parent, f"s3://{bucket}/model", endpoint_url=endpoint)
    assert counter["CreateMultipartUpload"] == 0 and counter["PutObject"] == 0


def test_download_dir_mirrors_a_prefix_and_resumes(s3_bucket, report_tree, tmp_path):
    endpoint, bucket = s3_bucket
    client = storage.s3_client(endpoint)
    storage.upload_dir(report_tree, f"s3://{bucket}/data/tfrecords", endpoint_url=endpoint)
    # A sibling prefix that merely starts with the same characters is not part of the folder.
    client.put_object(Bucket=bucket, Key="data/tfrecords-old/x.tfrecord", Body=b"old")
    client.put_object(Bucket=bucket, Key="data/tfrecords/emptydir/", Body=b"")

    out = tmp_path / "local"
    got = storage.download_dir(f"s3://{bucket}/data/tfrecords/", out, endpoint_url=endpoint)
    assert got == sorted(out / rel for rel in EXPECTED_TYPES)
    for rel in EXPECTED_TYPES:
        assert (out / rel).read_bytes() == (report_tree / rel).read_bytes()
    assert not (out / "x.tfrecord").exists()
    assert not list(out.rglob(".*")), "temp files left behind"

    counter = CallCounter(f"s3://{bucket}/data/tfrecords", endpoint)
    storage.download_dir(f"s3://{bucket}/data/tfrecords", out, endpoint_url=endpoint)
    assert counter["GetObject"] == 0, "files already present were fetched again"

    (out / "report.md").write_text("corrupted", encoding="utf-8")
    (out / "stale.bin").write_bytes(b"x")
    storage.download_dir(f"s3://{bucket}/data/tfrecords", out, endpoint_url=endpoint, delete=True)
    assert (out / "report.md").read_bytes() == (report_tree / "report.md").read_bytes()
    assert not (out / "stale.bin").exists()
    assert counter["GetObject"] == 1


def test_download_of_an_empty_prefix_is_empty(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    assert storage.download_dir(f"s3://{bucket}/nothing/here", tmp_path / "m", endpoint_url=endpoint) == []


def test_file_uri_and_plain_path_round_trip(report_tree, tmp_path):
    dest = tmp_path / "mirror"
    uris = storage.upload_dir(report_tree, dest.as_uri(), delete=True)
    assert uris == sorted((dest / rel).as_uri() for rel in EXPECTED_TYPES)
    back = storage.download_dir(str(dest), tmp_path / "back")
    assert [p.relative_to(tmp_path / "back").as_posix() for p in back] == sorted(EXPECTED_TYPES)
    for rel in EXPECTED_TYPES:
        assert (tmp_path / "back" / rel).read_bytes() == (report_tree / rel).read_bytes()


def test_presigned_url_fetches_without_credentials(s3_bucket, report_tree):
    endpoint, bucket = s3_bucket
    storage.upload_dir(report_tree, f"s3://{bucket}/p", endpoint_url=endpoint)
    url = storage.presigned_url(f"s3://{bucket}/p/report.html", endpoint_url=endpoint, expires_in=60)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == (report_tree / "report.html").read_bytes()
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"


# --------------------------------------------------------------------------------------------------
# Errors: one clear line naming bucket, key and reason
# --------------------------------------------------------------------------------------------------


def test_missing_bucket_is_a_clear_error(s3_server, s3_env, report_tree):
    with pytest.raises(storage.StorageError) as err:
        storage.upload_dir(report_tree, "s3://personcar-no-such-bucket/runs/r1", endpoint_url=s3_server)
    msg = str(err.value)
    assert "\n" not in msg
    assert "s3://personcar-no-such-bucket/" in msg and "does not exist" in msg
    assert err.value.code == "NoSuchBucket" and err.value.bucket == "personcar-no-such-bucket"
    assert isinstance(err.value, PersoncarError)


def test_refused_credentials_are_a_clear_error(strict_s3_server, report_tree, tmp_path):
    wrong = {"endpoint_url": strict_s3_server, "options": {"key": "AKIANOTAREALKEY00000", "secret": "wrong",
                                                           "client_kwargs": {"region_name": "us-east-1"}}}
    with pytest.raises(storage.StorageError) as err:
        storage.upload_dir(report_tree, "s3://some-bucket/runs/r1", **wrong)
    msg = str(err.value)
    assert "\n" not in msg and "s3://some-bucket/" in msg
    assert "credentials refused" in msg and "InvalidAccessKeyId" in msg
    with pytest.raises(storage.StorageError, match="credentials refused"):
        storage.download_dir("s3://some-bucket/runs/r1", tmp_path / "d", **wrong)


def test_unreachable_endpoint_is_a_clear_error(monkeypatch, s3_env, report_tree):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    dead = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on
    with pytest.raises(storage.StorageError) as err:
        storage.download_dir("s3://bucket-x/data", report_tree.parent / "d", endpoint_url=dead)
    msg = str(err.value)
    assert "\n" not in msg and "unreachable" in msg and "s3://bucket-x/data/" in msg
    assert err.value.code == "EndpointUnreachable"


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(PersoncarError, match="does not exist"):
        storage.upload_dir(tmp_path / "nope", (tmp_path / "dest").as_uri())


def test_moto_refuses_stale_conditional_writes(s3_bucket):
    """The index update relies on conditional PutObject; check this server honours it."""
    endpoint, bucket = s3_bucket
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    first = client.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    client.put_object(Bucket=bucket, Key="k", Body=b"3", IfMatch=first["ETag"])
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=bucket, Key="k", Body=b"4", IfMatch=first["ETag"])
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
