"""Artifact storage: mirror folders to and from ``s3://`` prefixes or local (``file://``) folders.

Plain boto3, no Airflow: the same functions serve the Airflow tasks, the ``personcar`` CLI and the
trainer container (``personcar train --data s3://... --model-dir s3://...`` syncs its inputs down,
trains, and syncs the checkpoints up).

Locations are written three ways and mean the same thing everywhere:

* ``s3://bucket/prefix``: an S3 prefix (path-style addressing when an ``endpoint_url`` is given,
  e.g. MinIO, Ceph or moto);
* ``file:///abs/folder``: a local folder;
* a plain path: a local folder.

Every S3 failure becomes a :class:`StorageError` (a ``PersoncarError``) whose one-line message names
the bucket, the key and the reason (missing bucket, refused credentials, unreachable endpoint...).
Transient errors (throttling, 5xx, dropped connections) are retried by botocore's ``standard`` retry
mode with exponential backoff; ``AWS_MAX_ATTEMPTS`` overrides its default of 3 attempts.
"""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from tasks.errors import PersoncarError
from tasks.logs import log

#: Objects at or above this size go up in parts of this size (also used to predict their ETag).
MULTIPART_CHUNK = 16 * 1024 * 1024
#: Parallel transfers for a folder.
MAX_WORKERS = 8

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".pbtxt": "text/plain; charset=utf-8",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".gz": "application/gzip",
    ".tfrecord": "application/octet-stream",
    ".pb": "application/octet-stream",
}

# Error codes that mean "these credentials are not accepted" rather than "this object is missing".
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
}


class StorageError(PersoncarError):
    """An S3 or local storage operation failed; the message names bucket, key and reason."""

    def __init__(self, message: str, *, bucket: str | None = None, key: str | None = None,
                 reason: str | None = None, code: str | None = None):
        super().__init__(message)
        self.bucket, self.key, self.reason, self.code = bucket, key, reason, code


# --------------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------------


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` locations; ``file://`` URIs and plain paths are local."""
    return str(uri).lower().startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")`` (no leading or trailing slash on the prefix)."""
    parsed = urlparse(str(uri))
    if parsed.scheme.lower() != "s3" or not parsed.netloc:
        raise PersoncarError(f"{uri}: not an s3://bucket/prefix location")
    return parsed.netloc, unquote(parsed.path).strip("/")


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The local folder a ``file://`` URI or plain path names."""
    text = str(uri)
    if text.lower().startswith("file:"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise PersoncarError(f"{text}: file:// URIs must name a local path (host {parsed.netloc!r})")
        return Path(url2pathname(parsed.path))
    if "://" in text:
        raise PersoncarError(f"{text}: unsupported location; use s3://bucket/prefix, file:///path or a path")
    return Path(text).expanduser()


def join_uri(base: str, *parts: str) -> str:
    """Join key parts onto an ``s3://`` or ``file://`` location (or a plain path) with ``/``."""
    out = str(base).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def content_type(path: str | os.PathLike[str]) -> str:
    """The Content-Type to store a file under, from its extension."""
    suffix = Path(path).suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(str(path))
    if guessed and guessed.startswith("text/"):
        return f"{guessed}; charset=utf-8"
    return guessed or "application/octet-stream"


def _safe_rel(rel: str, where: str) -> str:
    """A relative key part with no ``..``/absolute components (keys are joined onto folders)."""
    rel = rel.replace("\\", "/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or rel.startswith("/") or any(p == ".." for p in parts):
        raise PersoncarError(f"{where}: unsafe relative path {rel!r} (must stay inside the folder)")
    return "/".join(parts)


def list_files(local: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, file)`` for every regular file under ``local``, sorted."""
    out = []
    for path in sorted(local.rglob("*")):
        if path.is_file():
            out.append((path.relative_to(local).as_posix(), path))
    return out


# --------------------------------------------------------------------------------------------------
# S3 client and errors
# --------------------------------------------------------------------------------------------------


def s3_client(
    endpoint_url: str | None = None,
    *,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
    aws_session_token: str | None = None,
    region_name: str | None = None,
) -> Any:
    """A boto3 S3 client with standard-mode retries, bounded timeouts and a connection pool.

    Credentials and region come from the arguments or boto3's usual chain (environment, profile,
    instance role). ``endpoint_url`` (or boto3's own ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``)
    points at an S3-compatible server; path-style addressing is used for it.
    """
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or None
    s3_opts: dict[str, Any] = {}
    if endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        s3_opts["addressing_style"] = "path"
    config = Config(
        retries={"mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max(16, MAX_WORKERS * 2),
        s3=s3_opts or None,
    )
    session = boto3.session.Session(
        aws_access_key_id=aws_access_key_id,
        aws_secret_access_key=aws_secret_access_key,
        aws_session_token=aws_session_token,
        region_name=region_name,
    )
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def _client(client: Any, endpoint_url: str | None) -> Any:
    return client if client is not None else s3_client(endpoint_url)


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``PreconditionFailed``...)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status) if status else None
    return None


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def s3_error(exc: BaseException, *, bucket: str, key: str, action: str,
             endpoint_url: str | None = None) -> StorageError:
    """Translate a botocore exception into a one-line :class:`StorageError`."""
    from botocore import exceptions as bex

    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    code: str | None = None
    if isinstance(exc, bex.ClientError):
        code = error_code(exc)
        status = http_status(exc)
        message = str(exc.response.get("Error", {}).get("Message") or "").strip()
        if code == "NoSuchBucket":
            reason = f"bucket {bucket!r} does not exist"
        elif code in _CREDENTIAL_CODES or status == 403 or code == "403":
            reason = f"credentials refused ({code or status}: {message or 'Forbidden'})"
        elif code in ("NoSuchKey", "404") or status == 404:
            reason = "no such key"
        else:
            reason = f"{code or status}: {message or 'request failed'}"
    elif isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        code = "NoCredentials"
        reason = ("no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                  "AWS_PROFILE or an instance role)")
    elif isinstance(exc, bex.EndpointConnectionError | bex.ConnectTimeoutError | bex.ConnectionClosedError
                    | bex.ReadTimeoutError | bex.ProxyConnectionError):
        code = "EndpointUnreachable"
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url") or endpoint_url or "the S3 endpoint"
        reason = f"endpoint {endpoint} unreachable ({type(exc).__name__})"
    elif isinstance(exc, bex.ParamValidationError):
        code = "InvalidParameter"
        reason = " ".join(str(exc).split())
    else:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    reason = " ".join(reason.split())
    return StorageError(f"{action} {where} failed: {reason}", bucket=bucket, key=key, reason=reason,
                        code=code)


@contextlib.contextmanager
def translate_errors(*, bucket: str, key: str, action: str, endpoint_url: str | None = None) -> Iterator[None]:
    """Re-raise botocore errors raised inside the block as :class:`StorageError`."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(exc, bucket=bucket, key=key, action=action, endpoint_url=endpoint_url) from exc


def _endpoint_of(client: Any) -> str | None:
    return getattr(getattr(client, "meta", None), "endpoint_url", None)


def s3_etag(path: Path, chunk: int = MULTIPART_CHUNK) -> str:
    """The ETag S3 gives ``path`` when uploaded with :func:`upload_dir` (MD5, or multipart MD5)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < chunk:
            h = hashlib.md5(usedforsecurity=False)
            while block := f.read(1 << 20):
                h.update(block)
            return h.hexdigest()
        digests = []
        while True:
            h = hashlib.md5(usedforsecurity=False)
            left = chunk
            while left and (block := f.read(min(left, 1 << 20))):
                h.update(block)
                left -= len(block)
            if left == chunk:
                break
            digests.append(h.digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK,
                          max_concurrency=4)


def list_objects(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """``{key: {"Size", "ETag", "LastModified"}}`` for every object under ``prefix/``."""
    prefix = prefix.strip("/")
    list_prefix = f"{prefix}/" if prefix else ""
    out: dict[str, dict[str, Any]] = {}
    with translate_errors(bucket=bucket, key=list_prefix, action="list",
                          endpoint_url=_endpoint_of(client)):
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=list_prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = {
                    "Size": obj["Size"],
                    "ETag": str(obj.get("ETag", "")).strip('"'),
                    "LastModified": obj.get("LastModified"),
                }
    return out


def _run_parallel(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """Run ``fn`` over ``items`` on a small thread pool; the first error propagates."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(items))) as pool:
        return list(pool.map(fn, items))


# --------------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------------


def upload_files(
    files: Iterable[tuple[str, Path]],
    uri: str,
    *,
    client: Any = None,
    endpoint_url: str | None = None,
    delete: bool = False,
    skip_unchanged: bool = True,
) -> list[str]:
    """Put ``(relative path, local file)`` pairs under ``uri``; returns the destination URIs.

    ``delete`` removes whatever else is under ``uri`` afterwards (a mirror); ``skip_unchanged``
    leaves objects whose size and ETag (local files: size and mtime) already match.
    """
    pairs = sorted((_safe_rel(rel, str(uri)), Path(p)) for rel, p in files)
    seen: set[str] = set()
    for rel, path in pairs:
        if rel in seen:
            raise PersoncarError(f"{uri}: two files would be written to {rel!r}")
        if not path.is_file():
            raise PersoncarError(f"{path}: not a file, cannot upload to {uri}")
        seen.add(rel)
    if is_remote(uri):
        return _upload_s3(pairs, uri, client=_client(client, endpoint_url), delete=delete,
                          skip_unchanged=skip_unchanged)
    return _copy_local(pairs, local_path(uri), delete=delete, skip_unchanged=skip_unchanged)


def upload_dir(
    local: Path,
    uri: str,
    *,
    client: Any = None,
    endpoint_url: str | None = None,
    delete: bool = False,
    skip_unchanged: bool = True,
) -> list[str]:
    """Mirror the folder ``local`` to ``uri`` (``s3://bucket/prefix``, ``file://`` URI or a path).

    Objects get a Content-Type from their extension (``text/html; charset=utf-8``, ``image/png``,
    ``application/json``, ``text/markdown; charset=utf-8``...). Unchanged objects are skipped, so
    syncing a checkpoint folder again only sends the new files. Returns the URIs of all mirrored
    files, sorted.
    """
    local = Path(local)
    if not local.is_dir():
        raise PersoncarError(f"{local}: folder to upload does not exist")
    return upload_files(list_files(local), uri, client=client, endpoint_url=endpoint_url,
                        delete=delete, skip_unchanged=skip_unchanged)


def _upload_s3(pairs: list[tuple[str, Path]], uri: str, *, client: Any, delete: bool,
               skip_unchanged: bool) -> list[str]:
    bucket, prefix = split_s3(uri)
    endpoint = _endpoint_of(client)
    existing = list_objects(client, bucket, prefix) if (delete or skip_unchanged) else {}
    config = _transfer_config()
    keys = {rel: f"{prefix}/{rel}" if prefix else rel for rel, _ in pairs}
    sent = [0, 0]

    def put(pair: tuple[str, Path]) -> str:
        rel, path = pair
        key = keys[rel]
        have = existing.get(key)
        if (skip_unchanged and have and have["Size"] == path.stat().st_size
                and have["ETag"] == s3_etag(path)):
            return f"s3://{bucket}/{key}"
        with translate_errors(bucket=bucket, key=key, action="upload to", endpoint_url=endpoint):
            client.upload_file(str(path), bucket, key, ExtraArgs={"ContentType": content_type(path)},
                               Config=config)
        sent[0] += 1
        sent[1] += path.stat().st_size
        return f"s3://{bucket}/{key}"

    out = _run_parallel(put, pairs)
    if delete:
        stale = sorted(set(existing) - set(keys.values()))
        delete_keys(client, bucket, stale)
    log.info("uploaded %d/%d files (%.1f MB) to s3://%s/%s", sent[0], len(pairs), sent[1] / 1e6,
             bucket, prefix)
    return out


def delete_keys(client: Any, bucket: str, keys: list[str]) -> None:
    """Delete ``keys`` from ``bucket`` in batches of 1,000."""
    endpoint = _endpoint_of(client)
    for i in range(0, len(keys), 1000):
        batch = keys[i:i + 1000]
        with translate_errors(bucket=bucket, key=batch[0], action="delete", endpoint_url=endpoint):
            resp = client.delete_objects(Bucket=bucket,
                                         Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        errors = resp.get("Errors") or []
        if errors:
            e = errors[0]
            raise StorageError(f"delete s3://{bucket}/{e.get('Key')} failed: {e.get('Code')}: "
                               f"{e.get('Message')}", bucket=bucket, key=e.get("Key"),
                               reason=str(e.get("Code")), code=str(e.get("Code")))


def _same_local(src: Path, dst: Path) -> bool:
    try:
        a, b = src.stat(), dst.stat()
    except FileNotFoundError:
        return False
    return a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime)


def copy_file_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temp file beside ``dst`` and a rename (keeps mtime)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _copy_local(pairs: list[tuple[str, Path]], dest: Path, *, delete: bool, skip_unchanged: bool) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    copied = 0
    for rel, path in pairs:
        target = dest / rel
        if skip_unchanged and _same_local(path, target):
            continue
        copy_file_atomic(path, target)
        copied += 1
    if delete:
        keep = {rel for rel, _ in pairs}
        for rel, path in list_files(dest):
            if rel not in keep:
                path.unlink()
    log.info("copied %d/%d files to %s", copied, len(pairs), dest)
    return [(dest / rel).resolve().as_uri() for rel, _ in pairs]


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


def download_dir(
    uri: str,
    local: Path,
    *,
    client: Any = None,
    endpoint_url: str | None = None,
    delete: bool = False,
) -> list[Path]:
    """Mirror the prefix ``uri`` into the folder ``local``; returns the local files, sorted.

    Files already present with the same size and ETag are not fetched again (so a trainer pod
    restarted on the same volume resumes without re-downloading), each file lands through a temp
    file and a rename, and an empty or absent prefix gives an empty list (a first training run has
    no checkpoint yet). ``delete`` removes local files that are not under ``uri``.
    """
    local = Path(local)
    if is_remote(uri):
        out = _download_s3(uri, local, client=_client(client, endpoint_url))
    else:
        src = local_path(uri)
        if not src.exists():
            out = []
        elif not src.is_dir():
            raise PersoncarError(f"{src}: not a folder, cannot download {uri}")
        else:
            _copy_local(list_files(src), local, delete=False, skip_unchanged=True)
            out = [local / rel for rel, _ in list_files(src)]
    if delete and local.is_dir():
        keep = {p.resolve() for p in out}
        for _, path in list_files(local):
            if path.resolve() not in keep:
                path.unlink()
    return sorted(out)


def _download_s3(uri: str, local: Path, *, client: Any) -> list[Path]:
    bucket, prefix = split_s3(uri)
    endpoint = _endpoint_of(client)
    objects = list_objects(client, bucket, prefix)
    start = len(prefix) + 1 if prefix else 0
    todo: list[tuple[str, dict[str, Any], Path]] = []
    for key, meta in sorted(objects.items()):
        if key.endswith("/"):
            continue  # "folder" marker objects
        rel = _safe_rel(key[start:], f"s3://{bucket}/{key}")
        todo.append((key, meta, local / rel))
    local.mkdir(parents=True, exist_ok=True)
    got = [0, 0]

    def fetch(item: tuple[str, dict[str, Any], Path]) -> Path:
        key, meta, target = item
        if _matches(target, meta):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        try:
            with translate_errors(bucket=bucket, key=key, action="download", endpoint_url=endpoint):
                client.download_file(bucket, key, tmp, Config=_transfer_config())
            modified = meta.get("LastModified")
            if isinstance(modified, datetime):
                ts = modified.timestamp()
                os.utime(tmp, (ts, ts))
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        got[0] += 1
        got[1] += meta["Size"]
        return target

    out = _run_parallel(fetch, todo)
    log.info("downloaded %d/%d files (%.1f MB) from s3://%s/%s", got[0], len(todo), got[1] / 1e6,
             bucket, prefix)
    return out


def _matches(target: Path, meta: dict[str, Any]) -> bool:
    """Whether a local file already holds the object described by ``meta``."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return False
    if st.st_size != meta["Size"]:
        return False
    etag = meta.get("ETag") or ""
    if "-" not in etag:
        return s3_etag(target, chunk=max(MULTIPART_CHUNK, st.st_size + 1)) == etag
    if s3_etag(target) == etag:
        return True
    modified = meta.get("LastModified")
    return isinstance(modified, datetime) and int(st.st_mtime) == int(modified.timestamp())


# --------------------------------------------------------------------------------------------------
# Small objects
# --------------------------------------------------------------------------------------------------


def read_bytes(uri: str, *, client: Any = None, endpoint_url: str | None = None) -> bytes | None:
    """The content of one object or local file, or ``None`` when it does not exist."""
    if is_remote(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        client = _client(client, endpoint_url)
        with translate_errors(bucket=bucket, key=key, action="read", endpoint_url=_endpoint_of(client)):
            try:
                return client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if error_code(exc) in ("NoSuchKey", "404"):
                    return None
                raise
    path = local_path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def presigned_url(uri: str, *, client: Any = None, endpoint_url: str | None = None,
                  expires_in: int = 3600) -> str:
    """A time-limited HTTPS (or endpoint) URL that fetches the object ``uri`` without credentials."""
    bucket, key = split_s3(uri)
    client = _client(client, endpoint_url)
    with translate_errors(bucket=bucket, key=key, action="presign", endpoint_url=_endpoint_of(client)):
        return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                             ExpiresIn=expires_in)
