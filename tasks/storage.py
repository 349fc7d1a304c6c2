"""Artifact storage: run folders and published reports at ``s3://`` prefixes or local paths, via fsspec.

One layer for the Airflow tasks, the ``personcar`` CLI and the trainer pods. :func:`location`
turns a URI into an fsspec path: inside Airflow with a connection id it is Airflow's
``ObjectStoragePath``, whose S3 filesystem takes the AWS connection's credentials and endpoint the
hook's way; elsewhere (the CLI, a trainer pod) it is a ``UPath`` with botocore's own chain
(environment, profile, instance or pod role) and an optional endpoint. A connection that is
missing or holds no credentials is an error naming it, never a silent anonymous fallback.

What TensorFlow needs stays local (it has no S3 filesystem): :class:`Staging` mirrors inputs
down and outputs up, and the model folder again after every checkpoint, sending only files whose
size and ETag changed (S3's ETag is the MD5, or the multipart MD5 of s3fs's part size).
Publishing's conditional index writes use the boto3 client of :func:`s3_client` (the same
connection). Every failure is a :class:`StorageError` naming the location and the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from tasks.artifacts import copy_file_atomic, write_bytes_atomic
from tasks.errors import PersoncarError, TemporaryError
from tasks.logs import log

MAX_WORKERS = 8
_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "AccessDenied", "InvalidClientTokenId", "403")


class StorageError(TemporaryError):
    """A storage operation failed; the message names the location and the reason (``code``: what kind)."""

    def __init__(self, message: str, *, code: str | None = None, bucket: str | None = None) -> None:
        super().__init__(message)
        self.code, self.bucket = code, bucket


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` locations; ``file://`` URIs and plain paths are local."""
    return str(uri).lower().startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(str(uri))
    if parsed.scheme.lower() != "s3" or not parsed.netloc:
        raise PersoncarError(f"{uri}: not an s3://bucket/prefix location")
    return parsed.netloc, unquote(parsed.path).strip("/")


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The local path a ``file://`` URI or plain path names."""
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
    out = str(base).rstrip("/")
    for part in parts:
        if part := str(part).strip("/"):
            out = f"{out}/{part}"
    return out


def safe_rel(rel: str, where: str) -> str:
    """A relative key with no ``..`` or absolute part (keys are joined onto folders)."""
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or rel.startswith("/") or ".." in parts:
        raise PersoncarError(f"{where}: unsafe relative path {rel!r} (must stay inside the folder)")
    return "/".join(parts)


def list_files(local: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, file)`` for every regular file under ``local``, sorted."""
    return [(p.relative_to(local).as_posix(), p) for p in sorted(local.rglob("*")) if p.is_file()]


def aws_hook(conn_id: str | None) -> Any:
    """The ``S3Hook`` of the Airflow connection ``conn_id``, or None when Airflow or the connection is
    absent and botocore's own chain (environment, profile, role) has credentials. Never anonymous:
    a connection without credentials, or no credentials at all, is an error naming the connection."""
    if not conn_id:
        return None
    try:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.sdk import Connection
    except ImportError:  # the CLI and the trainer pods run without Airflow
        return None
    try:
        Connection.get(conn_id)
    except Exception as exc:  # not defined (or no metadata database at all)
        import boto3

        if boto3.session.Session().get_credentials() is None:
            raise StorageError(f"AWS connection {conn_id!r} is not defined ({type(exc).__name__}) and no AWS "
                               "credentials were found: define it (or set PERSONCAR_AWS_CONN_ID); S3 is never "
                               "read anonymously") from exc
        log.info("AWS connection %r is not defined; using the environment's AWS credentials", conn_id)
        return None
    hook = S3Hook(aws_conn_id=conn_id)
    creds = hook.get_credentials()
    if creds is None or not creds.access_key:
        raise StorageError(f"AWS connection {conn_id!r} holds no credentials and none were found for it "
                           "(environment, profile or role); S3 is never read anonymously")
    return hook


def location(uri: str, *, conn_id: str | None = None, endpoint_url: str | None = None,
             options: dict[str, Any] | None = None) -> Any:
    """An fsspec path for ``uri``: ``ObjectStoragePath`` through the Airflow connection ``conn_id``,
    else a ``UPath`` (``endpoint_url`` / ``options`` for s3fs: key, secret, token...)."""
    from upath import UPath

    if not is_remote(uri):
        return UPath(local_path(uri).absolute())
    if aws_hook(conn_id) is not None:
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(uri, conn_id=conn_id)
    opts = dict(options or {})
    if endpoint_url:
        opts.setdefault("endpoint_url", endpoint_url)
    opts.setdefault("config_kwargs", {"retries": {"mode": "standard"}, "connect_timeout": 10, "read_timeout": 60})
    return UPath(uri, **opts)


def s3_client(endpoint_url: str | None = None, *, conn_id: str | None = None, **credentials: Any) -> Any:
    """A boto3 S3 client: the Airflow connection's (``S3Hook``) or botocore's chain with ``endpoint_url``."""
    if (hook := aws_hook(conn_id)) is not None:
        return hook.get_conn()
    import boto3
    from botocore.config import Config

    path_style = {"addressing_style": "path"} if endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") else None
    config = Config(retries={"mode": "standard"}, connect_timeout=10, read_timeout=60,
                    max_pool_connections=2 * MAX_WORKERS, s3=path_style)
    return boto3.session.Session(**credentials).client("s3", endpoint_url=endpoint_url or None, config=config)


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``PreconditionFailed``...)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(err.get("Code") or status or "") or None
    return None


def _reason(exc: BaseException, uri: str) -> tuple[str, str]:
    """(code, what went wrong in words): a missing bucket, refused credentials, an unreachable endpoint."""
    from botocore import exceptions as bex

    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, bex.BotoCoreError | bex.ClientError):
        cause = cause.__cause__
    code = error_code(cause) or ""
    text = " ".join(str(cause).split())
    found = next((c for c in _CREDENTIAL_CODES if c in text), None)
    if code == "NoSuchBucket" or "bucket does not exist" in text.lower() or "NoSuchBucket" in text:
        return "NoSuchBucket", f"bucket {split_s3(uri)[0]!r} does not exist" if is_remote(uri) else text
    if code in _CREDENTIAL_CODES or found or isinstance(cause, PermissionError):
        return code or found or "AccessDenied", f"credentials refused ({code or found or 'AccessDenied'}: {text[:160]})"
    if isinstance(cause, bex.NoCredentialsError | bex.PartialCredentialsError):
        return "NoCredentials", "no AWS credentials found (environment, profile, role or the Airflow connection)"
    if isinstance(cause, bex.EndpointConnectionError | bex.ConnectTimeoutError | bex.ReadTimeoutError) \
            or "Could not connect to the endpoint" in text:
        return "EndpointUnreachable", f"endpoint unreachable ({text[:160]})"
    return code or type(cause).__name__, f"{code or type(cause).__name__}: {text[:200]}"


@contextlib.contextmanager
def storage_errors(uri: str, action: str) -> Iterator[None]:
    """Re-raise storage failures inside the block as one-line :class:`StorageError`s naming ``uri``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except StorageError as exc:
        if exc.code == "NoSuchBucket" and not str(exc).startswith(action):
            raise StorageError(f"{action} {uri} failed: {exc}", code=exc.code, bucket=exc.bucket) from exc
        raise
    except (OSError, BotoCoreError, ClientError, ValueError) as exc:
        code, reason = _reason(exc, uri)
        raise StorageError(f"{action} {uri} failed: {reason}", code=code,
                           bucket=split_s3(uri)[0] if is_remote(uri) else None) from exc


def s3_etag(path: Path, chunk: int | None = None) -> str:
    """The ETag S3 gives ``path`` uploaded by s3fs in ``chunk`` parts: a plain MD5 below two parts,
    else the multipart MD5 of its parts (default: s3fs's 50 MiB, more for over 10,000 parts)."""
    from s3fs.core import calculate_chunksize

    size = path.stat().st_size
    chunk = chunk or calculate_chunksize(size)
    digests = []
    with open(path, "rb") as f:
        if size < 2 * chunk:
            h = hashlib.md5(usedforsecurity=False)
            while block := f.read(1 << 20):
                h.update(block)
            return h.hexdigest()
        while block := f.read(chunk):
            digests.append(hashlib.md5(block, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def _same(local: Path, info: dict[str, Any] | None) -> bool:
    """Whether a local file holds what ``info`` (fsspec's, of a remote or local file) describes."""
    if not info or not local.is_file() or local.stat().st_size != info.get("size"):
        return False
    etag = str(info.get("ETag") or "").strip('"')
    if etag:
        return s3_etag(local) == etag
    mtime = info.get("mtime") or info.get("created")
    return mtime is not None and int(float(mtime)) == int(local.stat().st_mtime)


def _listing(root: Any) -> dict[str, dict[str, Any]]:
    """``{relative path: info}`` of every file under an fsspec path (``{}`` when there is none)."""
    fs, base = root.fs, root.path.rstrip("/")
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        found = {}
    if not found and getattr(fs, "protocol", None) and "s3" in fs.protocol and not fs.exists(base.split("/")[0]):
        raise StorageError(f"bucket {base.split('/')[0]!r} does not exist", code="NoSuchBucket", bucket=base.split("/")[0])
    return {k[len(base) + 1:]: v for k, v in found.items() if v.get("type") != "directory" and k != base}


def _parallel(fn: Any, items: Iterable[Any]) -> list[Any]:
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(items))) as pool:
        return list(pool.map(fn, items))


def upload_files(files: Iterable[tuple[str, Path]], uri: str, *, delete: bool = False, skip_unchanged: bool = True,
                 **where: Any) -> list[str]:
    """Put ``(relative path, local file)`` pairs under ``uri``; ``delete`` removes whatever else is
    there (a mirror), ``skip_unchanged`` leaves files whose size and ETag (local: mtime) match.
    ``where``: :func:`location`'s ``conn_id`` / ``endpoint_url`` / ``options``. Returns their URIs."""
    pairs = sorted((safe_rel(rel, uri), Path(p)) for rel, p in files)
    if len({rel for rel, _ in pairs}) != len(pairs):
        raise PersoncarError(f"{uri}: two files would be written to the same name")
    for _, path in pairs:
        if not path.is_file():
            raise PersoncarError(f"{path}: not a file, cannot upload to {uri}")
    root = location(uri, **where)
    with storage_errors(uri.rstrip("/") + "/", "upload to"):
        existing = _listing(root) if (delete or skip_unchanged) else {}
        sent = []

        def put(pair: tuple[str, Path]) -> str:
            rel, path = pair
            target = root / rel
            if not (skip_unchanged and _same(path, existing.get(rel))):
                if is_remote(uri):
                    target.fs.put_file(str(path), target.path, ContentType=content_type(path))
                else:
                    copy_file_atomic(path, Path(target.path))
                sent.append(path.stat().st_size)
            return join_uri(uri, rel)

        out = _parallel(put, pairs)
        stale = sorted(set(existing) - {rel for rel, _ in pairs}) if delete else []
        if stale:
            root.fs.rm([(root / rel).path for rel in stale])
    log.info("stored %d of %d files (%.1f MB) in %s%s", len(sent), len(pairs), sum(sent) / 1e6, uri,
             f", removed {len(stale)}" if stale else "")
    return out


def upload_dir(local: Path, uri: str, *, delete: bool = False, skip_unchanged: bool = True, **where: Any) -> list[str]:
    """Mirror the folder ``local`` to ``uri`` (an ``s3://`` prefix, ``file://`` URI or path)."""
    local = Path(local)
    if not local.is_dir():
        raise PersoncarError(f"{local}: folder to upload does not exist")
    return upload_files(list_files(local), uri, delete=delete, skip_unchanged=skip_unchanged, **where)


def download_dir(uri: str, local: Path, *, delete: bool = False, names: Iterable[str] | None = None,
                 **where: Any) -> list[Path]:
    """Mirror ``uri`` (only ``names`` of it, when given) into the folder ``local``: files already there
    with the same size and ETag are kept, each new one lands through a temp file and a rename; an
    absent prefix gives ``[]``."""
    local = Path(local)
    root = location(uri, **where)
    with storage_errors(uri.rstrip("/") + "/", "download"):
        if not is_remote(uri) and Path(root.path).exists() and not Path(root.path).is_dir():
            raise PersoncarError(f"{root.path}: not a folder, cannot download {uri}")
        remote = {safe_rel(rel, uri): info for rel, info in _listing(root).items() if not rel.endswith("/")}
        if names is not None:
            wanted = set(names)
            remote = {rel: info for rel, info in remote.items() if rel in wanted}

        def fetch(item: tuple[str, dict[str, Any]]) -> Path:
            rel, info = item
            target = local / rel
            if not _same(target, info):
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
                os.close(fd)
                try:
                    root.fs.get_file((root / rel).path, tmp)
                    os.replace(tmp, target)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            return target

        out = sorted(_parallel(fetch, sorted(remote.items())))
    if delete and local.is_dir():
        keep = {p.resolve() for p in out}
        for _, path in list_files(local):
            if path.resolve() not in keep:
                path.unlink()
    return out


def read_bytes(uri: str, **where: Any) -> bytes | None:
    """The content of one object or file, or ``None`` when it does not exist."""
    p = location(uri, **where)
    with storage_errors(uri, "read"):
        try:  # one GET (a file object would pin the ETag it first saw: a busy index fails that check)
            return p.fs.cat_file(p.path)
        except FileNotFoundError as exc:
            if is_remote(uri) and not p.fs.exists(split_s3(uri)[0]):
                raise StorageError(f"read {uri} failed: bucket {split_s3(uri)[0]!r} does not exist",
                                   code="NoSuchBucket", bucket=split_s3(uri)[0]) from exc
            return None


def write_bytes(uri: str, data: bytes, *, content_type: str | None = None, **where: Any) -> None:
    """Write one object or file (locally through a temp file and a rename)."""
    p = location(uri, **where)
    with storage_errors(uri, "write"):
        if is_remote(uri):
            p.fs.pipe_file(p.path, data, ContentType=content_type or "application/octet-stream")
        else:
            write_bytes_atomic(p.path, data)


def list_names(uri: str, **where: Any) -> list[str]:
    """The files under a folder or prefix, as relative names, sorted; ``[]`` when there is none."""
    root = location(uri, **where)
    if not is_remote(uri) and (not Path(root.path).is_dir() or Path(root.path).is_symlink()):
        return []
    with storage_errors(uri.rstrip("/") + "/", "list"):
        return sorted(_listing(root))


def remove(uri: str, names: Iterable[str], **where: Any) -> None:
    """Delete the files ``names`` (relative to ``uri``)."""
    root = location(uri, **where)
    paths = [(root / safe_rel(n, uri)).path for n in names]
    if paths:
        with storage_errors(uri, "delete under"):
            root.fs.rm(paths)


def presigned_url(uri: str, *, expires_in: int = 3600, **where: Any) -> str:
    """A time-limited URL that fetches the object ``uri`` without credentials."""
    p = location(uri, **where)
    with storage_errors(uri, "presign"):
        return p.fs.url(p.path, expires=expires_in)


def content_type(path: str | os.PathLike[str]) -> str:
    """The Content-Type a file is stored under (browsers open report.html from S3 by it)."""
    import mimetypes

    suffix = Path(path).suffix.lower()
    special = {".md": "text/markdown", ".json": "application/json", ".pbtxt": "text/plain",
               ".yaml": "application/yaml", ".tfrecord": "application/octet-stream"}
    kind = special.get(suffix) or mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    return f"{kind}; charset=utf-8" if kind.startswith("text/") else kind
