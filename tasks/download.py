"""Download stage: fetch the dataset archive, verify it, extract it safely into ``DEST/trainval``.

Sources: ``s3://bucket/key`` (boto3; unsigned requests for public buckets when no credentials
are given or found), ``https://`` / ``http://`` (resumable with Range requests), ``file://`` URIs
and plain paths to a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive.

Remote archives are fetched into a cache folder (one entry per source URI): a ``.part`` file
that grows across attempts and across runs (an interrupted download resumes where it stopped,
guarded by the server's ETag / Last-Modified so a changed object is never stitched onto an old
prefix), then renamed into place once complete and verified. A second run with the same source
and checksum reuses the verified archive; without a checksum it reuses it when the remote
object's ETag and size are unchanged. Local archives are hashed in place; their hash is recorded
against the file's identity (device, inode, size, mtime and ctime), so an unchanged file is not
hashed again.

Extraction checks every member before it touches the disk: no absolute paths, no ``..``
components, no path or link that resolves outside the destination (checked against the real
folder as it is being built, so chains of symlinks cannot escape either), no device or fifo
files, and caps on the member count and on the extracted size: at most ``max_total_bytes``, at most
``max_ratio`` times the archive's own size (a gzip bomb inflates a thousandfold; images and JSON
never near a hundredfold) and never more than the free disk space less ``min_free_bytes``; the first
cap reached is named in the error. Extraction goes to a temp
folder beside ``dest`` that replaces ``dest`` in one rename only when complete and when the
production layout (``trainval/images/``, ``trainval/annotations/bbox-annotations.json``) is
present; on any failure ``dest`` is left exactly as it was. ``dest`` itself must be absent, empty or
an earlier download's (its manifest, or nothing but ``trainval/``): a folder with anything else
is refused before anything is fetched.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import gzip
import hashlib
import http.client
import json
import lzma
import os
import re
import shutil
import ssl
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from tasks import __version__
from tasks.artifacts import StageOutputs, atomic_dir, check_output_dir, write_json_atomic
from tasks.errors import PersoncarError
from tasks.logs import Progress, log

ANNOTATIONS_REL = "trainval/annotations/bbox-annotations.json"
IMAGES_REL = "trainval/images"
MANIFEST_NAME = "download_manifest.json"
OUTPUTS = StageOutputs("download", MANIFEST_NAME, keys=("sha256", "archive_name"), names=("trainval", MANIFEST_NAME))

CHUNK = 1 << 20
HTTP_TIMEOUT_S = 60.0
MAX_BACKOFF_S = 60.0
# HTTP statuses worth retrying; everything else in 4xx/5xx is reported at once.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "ServiceUnavailableException", "503", "500",
})
CREDENTIAL_S3_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AuthorizationHeaderMalformed",
})
_SECRET_QUERY = re.compile(r"signature|credential|token|secret|password|sig$|key$", re.IGNORECASE)


def default_cache_dir() -> Path:
    """``$PERSONCAR_CACHE_DIR``, else ``~/.cache/personcar/downloads``."""
    env = os.environ.get("PERSONCAR_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "personcar" / "downloads"


def download_dataset(
    source: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    endpoint_url: str | None = None,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
    aws_session_token: str | None = None,
    region_name: str | None = None,
    anonymous: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    retries: int = 5,
    max_total_bytes: int = 20 * 2**30,
    max_members: int = 200_000,
    max_ratio: float = 100.0,
    min_free_bytes: int = 256 * 2**20,
    progress_every: float = 5.0,
    retry_backoff_s: float = 1.0,
) -> dict[str, Any]:
    """Fetch, verify and safely extract the dataset archive ``source`` into ``dest``.

    ``dest`` ends up holding ``trainval/images/``, ``trainval/annotations/bbox-annotations.json``
    and ``download_manifest.json`` (the returned dict: ``source``, ``sha256``, ``size_bytes``,
    ``archive_name``, ``members``, ``images``, ``annotations_file`` and ``images_dir`` relative to
    ``dest``, ``extracted_bytes``, ``reused_cache``, ``seconds``). ``dest`` is replaced as a
    whole, in one rename, and only on success.

    ``anonymous``: True forces unsigned S3 requests, False requires credentials, None (default)
    signs when credentials are given or found (environment, shared files, instance role) and
    sends unsigned requests otherwise. ``retries``: consecutive failed attempts tolerated (a
    failure after some bytes arrived resets the count, the next attempt resumes), with
    exponential backoff starting at ``retry_backoff_s``. ``max_total_bytes`` / ``max_members`` /
    ``max_ratio`` (extracted bytes per archive byte) cap the extraction (decompression bombs), and
    it never leaves less than ``min_free_bytes`` free on the destination's disk.
    """
    t0 = time.monotonic()
    expected = _check_sha256(sha256)
    if retries < 0:
        raise PersoncarError(f"retries must be >= 0, got {retries}")
    if max_total_bytes <= 0 or max_members <= 0 or not max_ratio > 0 or min_free_bytes < 0:
        raise PersoncarError("max_total_bytes, max_members and max_ratio must be positive, min_free_bytes >= 0")
    src = _parse_source(source)
    dest = Path(dest).expanduser().absolute()
    cache = Path(cache_dir).expanduser().absolute() if cache_dir is not None else default_cache_dir().absolute()
    _check_dest(dest, cache, src)
    if endpoint_url and src.kind != "s3":
        log.warning("endpoint_url %s ignored: it only applies to s3:// sources", endpoint_url)

    log.info("download_dataset: source %s -> %s (cache %s)", src.display, dest, cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PersoncarError(f"cannot create cache folder {cache}: {e.strerror or e}") from None
    paths = _CachePaths.for_source(cache, src)

    try:
        with _locked(paths.lock, src.display):
            if src.kind == "local":
                archive, digest, size, reused = _prepare_local(src, paths, expected, progress_every)
            else:
                if src.kind == "s3":
                    remote: _Remote = _S3Remote.create(
                        src, endpoint_url=endpoint_url, aws_access_key_id=aws_access_key_id,
                        aws_secret_access_key=aws_secret_access_key,
                        aws_session_token=aws_session_token, region_name=region_name,
                        anonymous=anonymous)
                else:
                    remote = _HttpRemote(src.fetch, src.display)
                archive, digest, size, reused = _prepare_remote(
                    remote, src, paths, expected, retries=retries, backoff=retry_backoff_s,
                    progress_every=progress_every)
            manifest = _extract_into(
                archive, dest, src=src, digest=digest, size=size, reused=reused,
                max_total_bytes=max_total_bytes, max_members=max_members, max_ratio=max_ratio,
                min_free_bytes=min_free_bytes, progress_every=progress_every, t0=t0)
    except OSError as e:  # disk full, permissions: a user-actionable failure, not a traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise PersoncarError(f"cannot download {src.display}: {e.strerror or e}{where}") from None
    log.info("download_dataset: %s -> %s: %d members, %d images, %.1f MB extracted in %.1f s%s",
             src.display, dest, manifest["members"], manifest["images"],
             manifest["extracted_bytes"] / 1e6, manifest["seconds"],
             " (cached archive reused)" if reused else "")
    return manifest


# --------------------------------------------------------------------------------------------
# Sources and the cache


@dataclass(frozen=True)
class _Source:
    kind: str            # "s3" | "http" | "local"
    uri: str             # identity of the archive: the cache key (no secrets: a re-signed URL is the same archive)
    display: str         # for logs, errors and the manifest (no passwords or signatures)
    archive_name: str
    fetch: str = ""      # the URL as given, secrets included (http only)
    path: Path | None = None
    bucket: str = ""
    key: str = ""


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None or not sha256.strip():
        return None
    v = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", v):
        raise PersoncarError(f"sha256 must be 64 hexadecimal characters, got {sha256!r}")
    return v


def _parse_source(source: str) -> _Source:
    s = (source or "").strip()
    if not s:
        raise PersoncarError("source is empty: give s3://bucket/key, https://..., file://... or a path")
    scheme = s.split("://", 1)[0].lower() if "://" in s else ""
    if scheme == "s3":
        bucket, _, key = s[5:].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise PersoncarError(f"S3 source must be s3://bucket/key of an archive, got {s!r}")
        return _Source("s3", f"s3://{bucket}/{key}", f"s3://{bucket}/{key}",
                       _archive_name(key), bucket=bucket, key=key)
    if scheme in ("http", "https"):
        parts = urlsplit(s)
        if not parts.hostname:
            raise PersoncarError(f"URL has no host: {_redact(s)!r}")
        return _Source("http", _redact(s), _redact(s), _archive_name(unquote(parts.path)), fetch=s)
    if scheme == "file":
        parts = urlsplit(s)
        if parts.netloc not in ("", "localhost"):
            raise PersoncarError(f"file:// URI must name a local path (file:///path), got {s!r}")
        path = Path(urllib.request.url2pathname(parts.path))
        return _local_source(path, display=s)
    if scheme:
        raise PersoncarError(f"unsupported source scheme {scheme}:// in {_redact(s)!r}; "
                             "expected s3://, https://, http://, file:// or a path")
    return _local_source(Path(s).expanduser(), display=s)


def _local_source(path: Path, display: str) -> _Source:
    path = path.absolute()
    real = Path(os.path.realpath(path))
    return _Source("local", f"file://{real}", display, _archive_name(path.name), path=path)


def _archive_name(name: str) -> str:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base or "archive"


def _redact(uri: str) -> str:
    """Hide passwords and signed-URL secrets from logs, errors and manifests."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*/")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _check_dest(dest: Path, cache: Path, src: _Source) -> None:
    if dest.exists() and not dest.is_dir():
        raise PersoncarError(f"dest {dest} exists and is not a folder")
    if dest == Path(dest.anchor):
        raise PersoncarError("dest must not be the filesystem root")
    real_dest = os.path.realpath(dest)

    def inside(p: Path) -> bool:
        rp = os.path.realpath(p)
        return rp == real_dest or rp.startswith(real_dest.rstrip(os.sep) + os.sep)

    # dest is replaced as a whole: anything we still need must not live inside it
    if inside(cache):
        raise PersoncarError(f"cache folder {cache} is inside dest {dest}, which is replaced as a whole; "
                             "choose another cache folder")
    if src.path is not None and inside(src.path):
        raise PersoncarError(f"archive {src.path} is inside dest {dest}, which is replaced as a whole; "
                             "choose another dest")
    check_output_dir(dest, OUTPUTS, flag="--dest")


@dataclass(frozen=True)
class _CachePaths:
    archive: Path   # the complete, verified archive
    record: Path    # JSON: source, sha256, size, validator, fingerprint
    part: Path      # the download in progress
    part_meta: Path  # JSON: source, validator, total of the download in progress
    lock: Path

    @classmethod
    def for_source(cls, cache: Path, src: _Source) -> _CachePaths:
        key = hashlib.sha256(src.uri.encode("utf-8")).hexdigest()[:20]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", src.archive_name)[:80]
        base = cache / f"{key}-{name}"
        return cls(base, base.with_name(base.name + ".json"), base.with_name(base.name + ".part"),
                   base.with_name(base.name + ".part.json"), base.with_name(base.name + ".lock"))


@contextlib.contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """One process at a time per source (two Airflow tasks must not grow the same .part file)."""
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another download of %s to finish", what)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _fingerprint(st: os.stat_result) -> list[int]:
    # ctime cannot be set from user space: any write, rename over or chmod changes it
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _hash_file(path: Path, what: str, progress_every: float) -> tuple[str, int]:
    h = hashlib.sha256()
    size = path.stat().st_size
    progress = Progress(what, size, unit="bytes", every=progress_every)
    n = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            n += len(block)
            progress.update(len(block))
    progress.finish()
    return h.hexdigest(), n


def _mismatch(src: _Source, expected: str, actual: str, size: int, note: str) -> PersoncarError:
    return PersoncarError(f"sha256 mismatch for {src.display}: expected {expected}, got {actual} "
                          f"({size} bytes){note}")


# --------------------------------------------------------------------------------------------
# Local archives


def _prepare_local(src: _Source, paths: _CachePaths, expected: str | None,
                   progress_every: float) -> tuple[Path, str, int, bool]:
    assert src.path is not None
    try:
        st = src.path.stat()
    except FileNotFoundError:
        raise PersoncarError(f"archive not found: {src.display}") from None
    if not src.path.is_file():
        raise PersoncarError(f"source {src.display} is not a file (expected a .tar.gz/.tgz/.tar archive)")
    fp = _fingerprint(st)
    rec = _read_json(paths.record)
    if rec and rec.get("source") == src.uri and rec.get("fingerprint") == fp and rec.get("sha256"):
        digest, size, reused = str(rec["sha256"]), st.st_size, True
        log.info("archive %s unchanged since it was hashed (sha256 %s): not hashing again", src.display, digest)
    else:
        digest, size = _hash_file(src.path, f"hashing {src.display}", progress_every)
        reused = False
        if _fingerprint(src.path.stat()) == fp:  # not modified while we read it
            write_json_atomic(paths.record, {"source": src.uri, "sha256": digest, "size_bytes": size,
                                             "fingerprint": fp})
    if expected and digest != expected:
        raise _mismatch(src, expected, digest, size, "")
    return src.path, digest, size, reused


# --------------------------------------------------------------------------------------------
# Remote archives


class _Transient(Exception):
    """A failure worth retrying (connection refused/reset/dropped, timeout, 5xx, throttling)."""


class _Restart(Exception):
    """The remote object is not the one the partial file came from: start again from byte 0."""


@dataclass
class _Body:
    offset: int               # where the body starts in the object (0 when the whole object is sent)
    total: int | None         # size of the whole object, when known
    validator: str | None     # ETag (preferred) or Last-Modified
    read: Callable[[int], bytes]
    close: Callable[[], None]


class _Remote:
    display: str

    def open(self, start: int, validator: str | None, *, probe: bool = False) -> _Body:
        """Open the object from byte ``start`` (``probe``: only its metadata, via a 1-byte range)."""
        raise NotImplementedError


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m[1]), (None if m[3] == "*" else int(m[3]))


class _HttpRemote(_Remote):
    def __init__(self, url: str, display: str, timeout: float = HTTP_TIMEOUT_S):
        parts = urlsplit(url)
        self.auth: str | None = None
        if parts.username is not None:  # urllib does not send URL credentials by itself
            creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.auth = "Basic " + base64.b64encode(creds.encode("utf-8")).decode("ascii")
            url = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
        self.url, self.display, self.timeout = url, display, timeout

    def open(self, start: int, validator: str | None, *, probe: bool = False) -> _Body:
        headers = {"User-Agent": f"personcar/{__version__}", "Accept-Encoding": "identity"}
        if self.auth:
            headers["Authorization"] = self.auth
        if probe:
            headers["Range"] = "bytes=0-0"
        elif start > 0:
            headers["Range"] = f"bytes={start}-"
            if validator:
                headers["If-Range"] = validator
        try:
            resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                          timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416:
                if probe:  # an empty resource has no byte 0
                    return _Body(0, 0, e.headers.get("ETag"), lambda n: b"", lambda: None)
                raise _Restart(f"HTTP 416: the server has no byte {start}") from None
            if e.code in TRANSIENT_HTTP:
                raise _Transient(f"HTTP {e.code} {e.reason}") from None
            raise PersoncarError(f"cannot download {self.display}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise PersoncarError(f"cannot download {self.display}: TLS certificate rejected: "
                                     f"{reason.verify_message or reason}") from None
            raise _Transient(_one_line(reason) if isinstance(reason, BaseException) else " ".join(str(reason).split())) from None
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(f"{type(e).__name__}: {_one_line(e)}") from None
        etag = resp.headers.get("ETag")
        validator_out = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
        if resp.status == 206:
            cr = _parse_content_range(resp.headers.get("Content-Range"))
            if cr is None:
                resp.close()
                raise _Transient(f"unparseable Content-Range {resp.headers.get('Content-Range')!r}")
            offset, total = cr
        else:
            offset = 0
            cl = resp.headers.get("Content-Length", "")
            total = int(cl) if cl.strip().isdigit() else None

        def read(n: int) -> bytes:
            try:
                return resp.read(n)
            except (OSError, http.client.HTTPException) as e:
                raise _Transient(f"connection lost: {type(e).__name__}: {_one_line(e)}") from None

        return _Body(offset, total, validator_out, read, resp.close)


class _S3Remote(_Remote):
    def __init__(self, src: _Source, client: Any, anonymous: bool):
        self.bucket, self.key, self.display = src.bucket, src.key, src.display
        self.client, self.anonymous = client, anonymous

    @classmethod
    def create(cls, src: _Source, *, endpoint_url: str | None, aws_access_key_id: str | None,
               aws_secret_access_key: str | None, aws_session_token: str | None,
               region_name: str | None, anonymous: bool | None) -> _S3Remote:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        if bool(aws_access_key_id) != bool(aws_secret_access_key):
            raise PersoncarError("give both aws_access_key_id and aws_secret_access_key, or neither")
        if anonymous and aws_access_key_id:
            raise PersoncarError("anonymous S3 access was requested together with credentials; drop one")
        try:
            session = boto3.session.Session(
                aws_access_key_id=aws_access_key_id or None,
                aws_secret_access_key=aws_secret_access_key or None,
                aws_session_token=aws_session_token or None, region_name=region_name or None)
            creds = None if anonymous else session.get_credentials()
        except BotoCoreError as e:
            raise PersoncarError(f"cannot set up S3 access for {src.display}: {_one_line(e)}") from None
        if anonymous is False and creds is None:
            raise PersoncarError(f"no AWS credentials found for {src.display} and anonymous access is "
                                 "disabled; set an AWS connection or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        unsigned = creds is None
        if unsigned:
            log.info("S3 access to %s: anonymous (unsigned requests)", src.display)
        else:
            log.info("S3 access to %s: signed (credentials from %s)", src.display,
                     getattr(creds, "method", "unknown"))
        cfg: dict[str, Any] = {
            # one attempt per call: retries (with resume) are ours, so they are logged and counted once
            "retries": {"mode": "standard", "total_max_attempts": 1},
            "connect_timeout": 20, "read_timeout": HTTP_TIMEOUT_S,
        }
        if unsigned:
            cfg["signature_version"] = UNSIGNED
        try:
            client = session.client("s3", endpoint_url=endpoint_url or None, config=Config(**cfg))
        except (BotoCoreError, ValueError) as e:
            raise PersoncarError(f"cannot set up S3 access for {src.display}: {_one_line(e)}") from None
        return cls(src, client, unsigned)

    def open(self, start: int, validator: str | None, *, probe: bool = False) -> _Body:
        from botocore.exceptions import BotoCoreError, ClientError

        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if probe:
            kw["Range"] = "bytes=0-0"
        elif start > 0:
            kw["Range"] = f"bytes={start}-"
            if validator:
                kw["IfMatch"] = validator
        try:
            r = self.client.get_object(**kw)
        except ClientError as e:
            body = self._client_error(e, start, probe)
            if body is not None:
                return body
            raise AssertionError("unreachable") from None
        except BotoCoreError as e:
            if _is_transient_botocore(e):
                raise _Transient(f"{type(e).__name__}: {_one_line(e)}") from None
            raise PersoncarError(f"cannot download {self.display}: {_one_line(e)}") from None
        stream = r["Body"]
        cr = _parse_content_range(r.get("ContentRange"))
        offset, total = cr if cr is not None else (0, r.get("ContentLength"))

        def read(n: int) -> bytes:
            try:
                return stream.read(n)
            except Exception as e:  # botocore/urllib3 wrap socket failures in many classes
                if isinstance(e, OSError) or _is_transient_botocore(e) or _is_urllib3_error(e):
                    raise _Transient(f"connection lost: {type(e).__name__}: {_one_line(e)}") from None
                raise

        return _Body(offset, total, r.get("ETag"), read, stream.close)

    def _client_error(self, e: Any, start: int, probe: bool) -> _Body | None:
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = (e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0
        msg = " ".join(str(err.get("Message") or "").split())
        where = f"s3://{self.bucket}/{self.key}"
        if code == "NoSuchBucket":
            raise PersoncarError(f"cannot download {where}: bucket '{self.bucket}' does not exist") from None
        if code in ("NoSuchKey", "NotFound") or status == 404:
            raise PersoncarError(f"cannot download {where}: no object '{self.key}' in bucket "
                                 f"'{self.bucket}'") from None
        if code == "PreconditionFailed" or status == 412:
            raise _Restart("the S3 object changed since the partial download (ETag differs)") from None
        if code == "InvalidRange" or status == 416:
            if probe:
                return _Body(0, 0, None, lambda n: b"", lambda: None)
            raise _Restart(f"S3 has no byte {start} of the object") from None
        if code in CREDENTIAL_S3_CODES:
            raise PersoncarError(f"S3 rejected the credentials for {where}: {code}: {msg}".rstrip(": ")) from None
        if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
            how = ("an anonymous (unsigned) request; give credentials (an AWS connection or "
                   "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) for a private object") if self.anonymous \
                else "the given credentials"
            raise PersoncarError(f"access denied to {where} with {how}") from None
        if code in TRANSIENT_S3_CODES or status >= 500:
            raise _Transient(f"S3 {code or status}: {msg}".rstrip(": ")) from None
        raise PersoncarError(f"cannot download {where}: {code or status}: {msg}".rstrip(": ")) from None


def _is_transient_botocore(e: BaseException) -> bool:
    from botocore import exceptions as bx

    transient = (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)
    streaming = getattr(bx, "ResponseStreamingError", None)
    return isinstance(e, transient) or (streaming is not None and isinstance(e, streaming))


def _is_urllib3_error(e: BaseException) -> bool:
    try:
        from urllib3.exceptions import HTTPError
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        return False
    return isinstance(e, HTTPError)


def _prepare_remote(remote: _Remote, src: _Source, paths: _CachePaths, expected: str | None, *,
                    retries: int, backoff: float, progress_every: float) -> tuple[Path, str, int, bool]:
    cached = _cached_archive(remote, src, paths, expected, retries=retries, backoff=backoff,
                             progress_every=progress_every)
    if cached is not None:
        return cached
    digest, size, validator = _download_to_part(remote, src, paths, retries=retries, backoff=backoff,
                                                progress_every=progress_every)
    if expected and digest != expected:
        _unlink(paths.part, paths.part_meta)
        raise _mismatch(src, expected, digest, size, "; the downloaded file was deleted")
    os.replace(paths.part, paths.archive)
    st = paths.archive.stat()
    write_json_atomic(paths.record, {"source": src.uri, "sha256": digest, "size_bytes": size,
                                     "validator": validator, "fingerprint": _fingerprint(st),
                                     "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _unlink(paths.part_meta)
    log.info("downloaded %s: %d bytes, sha256 %s%s", src.display, size, digest,
             " (matches the expected checksum)" if expected else "")
    return paths.archive, digest, size, False


def _cached_archive(remote: _Remote, src: _Source, paths: _CachePaths, expected: str | None, *,
                    retries: int, backoff: float, progress_every: float) -> tuple[Path, str, int, bool] | None:
    """The verified archive from an earlier run, when it still is what the caller asks for."""
    if not paths.archive.is_file():
        return None
    rec = _read_json(paths.record)
    if not rec or rec.get("source") != src.uri or not rec.get("sha256"):
        log.info("cache entry %s has no valid record: fetching again", paths.archive.name)
        _unlink(paths.archive, paths.record)
        return None
    st = paths.archive.stat()
    if rec.get("fingerprint") == _fingerprint(st):
        digest, size = str(rec["sha256"]), st.st_size
    else:  # touched since it was verified: trust only a fresh hash
        digest, size = _hash_file(paths.archive, f"re-hashing cached {paths.archive.name}", progress_every)
        if digest != rec["sha256"]:
            log.warning("cached archive %s changed on disk: fetching again", paths.archive)
            _unlink(paths.archive, paths.record)
            return None
        rec["fingerprint"] = _fingerprint(paths.archive.stat())
        write_json_atomic(paths.record, rec)
    if expected:
        if digest == expected:
            log.info("reusing the verified cached archive %s for %s (sha256 %s): not fetching again",
                     paths.archive, src.display, digest)
            return paths.archive, digest, size, True
        log.info("cached archive for %s has sha256 %s, expected %s: fetching again",
                 src.display, digest, expected)
        _unlink(paths.archive, paths.record)
        return None
    # no checksum given: reuse only while the remote object is unchanged (ETag/Last-Modified, size)
    try:
        probe = _with_retries(lambda: remote.open(0, None, probe=True), src, retries, backoff)
    except _Unreachable as e:
        log.warning("cannot check %s for changes (%s); reusing the cached archive downloaded %s "
                    "(sha256 %s)", src.display, e, rec.get("downloaded_at", "earlier"), digest)
        return paths.archive, digest, size, True
    probe.close()
    same_size = probe.total is None or probe.total == size
    same_version = probe.validator is None or rec.get("validator") in (None, probe.validator)
    if same_size and same_version:
        log.info("reusing the cached archive %s for %s (unchanged at the source, sha256 %s): "
                 "not fetching again", paths.archive, src.display, digest)
        return paths.archive, digest, size, True
    log.info("%s changed since it was cached (size %s -> %s, version %s -> %s): fetching again",
             src.display, size, probe.total, rec.get("validator"), probe.validator)
    _unlink(paths.archive, paths.record)
    return None


class _Unreachable(Exception):
    pass


def _with_retries(fn: Callable[[], _Body], src: _Source, retries: int, backoff: float) -> _Body:
    failures = 0
    while True:
        try:
            return fn()
        except (_Transient, _Restart) as e:
            failures += 1
            if failures > retries:
                raise _Unreachable(str(e)) from None
            delay = min(backoff * 2 ** (failures - 1), MAX_BACKOFF_S)
            log.warning("%s: %s; retry %d/%d in %.1f s", src.display, e, failures, retries, delay)
            time.sleep(delay)


def _download_to_part(remote: _Remote, src: _Source, paths: _CachePaths, *, retries: int,
                      backoff: float, progress_every: float) -> tuple[str, int, str | None]:
    """Grow ``paths.part`` to the whole object; returns (sha256, size, validator)."""
    state = _read_json(paths.part_meta) if paths.part.exists() else None
    if paths.part.exists() and (not state or state.get("source") != src.uri):
        _unlink(paths.part)
        state = None
    validator: str | None = state.get("validator") if state else None
    total: int | None = state.get("total") if state else None
    hasher = hashlib.sha256()
    size = 0
    if paths.part.exists():
        with open(paths.part, "rb") as f:
            while block := f.read(CHUNK):
                hasher.update(block)
                size += len(block)
        if total is not None and size > total:
            _unlink(paths.part)
            hasher, size, validator, total = hashlib.sha256(), 0, None, None
        else:
            log.info("resuming the partial download of %s at byte %d%s", src.display, size,
                     f" of {total}" if total else "")
    progress = Progress(f"downloading {src.display}", total, unit="bytes", every=progress_every, done=size)
    failures = restarts = 0
    while True:
        gained = 0
        if size and total is not None and size == total:
            break  # a complete part file left by a run that stopped before renaming it
        try:
            body = remote.open(size, validator)
            try:
                if body.offset != size:
                    if body.offset != 0:
                        raise _Transient(f"server answered from byte {body.offset}, asked for {size}")
                    if size:
                        log.info("%s: the server sent the whole object instead of bytes %d-; "
                                 "starting again from byte 0", src.display, size)
                    _unlink(paths.part)
                    hasher, size = hashlib.sha256(), 0
                    progress.reset(0)
                elif size and total is not None and body.total is not None and body.total != total:
                    raise _Restart(f"object size changed from {total} to {body.total} bytes")
                elif size and validator and body.validator and body.validator != validator:
                    raise _Restart(f"object version changed from {validator} to {body.validator}")
                total, validator = body.total, body.validator
                progress.total = total
                write_json_atomic(paths.part_meta, {"source": src.uri, "validator": validator, "total": total})
                with open(paths.part, "ab") as f:
                    while total is None or size < total:
                        chunk = body.read(CHUNK if total is None else min(CHUNK, total - size))
                        if not chunk:
                            break
                        f.write(chunk)
                        hasher.update(chunk)
                        size += len(chunk)
                        gained += len(chunk)
                        progress.update(len(chunk))
            finally:
                with contextlib.suppress(Exception):
                    body.close()
            if total is not None and size < total:
                raise _Transient(f"connection closed after {size} of {total} bytes")
            break
        except (_Transient, _Restart) as e:
            if isinstance(e, _Restart):
                _unlink(paths.part, paths.part_meta)
                hasher, size, validator, total = hashlib.sha256(), 0, None, None
                progress.reset(0)
                restarts += 1
                if restarts == 1:  # the object changed since the partial download: start over at once
                    log.warning("%s: %s; starting again from byte 0", src.display, e)
                    continue
            if gained:
                failures = 0  # progress was made: this is a fresh interruption, not a dead source
            failures += 1
            if failures > retries:
                kept = f"; {size} bytes kept in the cache, the next run resumes" if size else ""
                raise PersoncarError(f"cannot download {src.display}: {_one_line(e)} (gave up after {retries} "
                                     f"retries{kept})") from None
            delay = min(backoff * 2 ** (failures - 1), MAX_BACKOFF_S)
            log.warning("download of %s interrupted: %s; retry %d/%d in %.1f s, %s", src.display, e,
                        failures, retries, delay,
                        f"resuming at byte {size}" if size else "starting from byte 0")
            time.sleep(delay)
    progress.finish()
    return hasher.hexdigest(), size, validator


# --------------------------------------------------------------------------------------------
# Safe extraction


_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _unsafe(name: str, archive_name: str, rule: str) -> PersoncarError:
    return PersoncarError(f"unsafe archive member {name!r} in {archive_name}: {rule}")


def _clean_member_path(raw: str, archive_name: str, what: str = "path") -> str:
    """Archive-relative path without '.' parts; refuses absolute paths and '..' components."""
    if raw.startswith("/") or os.path.isabs(raw):
        raise _unsafe(raw, archive_name, f"absolute {what}")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(raw, archive_name, f"{what} escapes the destination ('..' component)"
                      if what != "path" else "path escapes the destination")
    return "/".join(parts)


def _within(root_real: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


@dataclass(frozen=True)
class _SizeCaps:
    """Upper bounds on the extracted bytes, each with the rule an error names; the first one reached wins."""

    caps: tuple[tuple[int, str], ...]

    @classmethod
    def of(cls, archive_size: int, folder: Path, *, max_total_bytes: int, max_ratio: float,
           min_free_bytes: int) -> _SizeCaps:
        free = shutil.disk_usage(folder).free
        return cls(((max_total_bytes, f"max_total_bytes={max_total_bytes} (decompression bomb cap)"),
                    (int(max_ratio * max(archive_size, 1)),
                     f"max_ratio={max_ratio:g} times the archive's {archive_size} bytes (decompression bomb cap)"),
                    (max(free - min_free_bytes, 0),
                     f"the free disk space ({free} bytes free at {folder}, min_free_bytes={min_free_bytes} kept)")))

    def exceeded(self, total: int) -> str | None:
        return next((rule for limit, rule in self.caps if total > limit), None)


def _extract_members(archive: Path, archive_name: str, root: Path, *, max_total_bytes: int,
                     max_members: int, progress_every: float, max_ratio: float = 100.0,
                     min_free_bytes: int = 0) -> tuple[int, int]:
    """Extract ``archive`` into the empty folder ``root``; returns (members, extracted bytes)."""
    root_real = os.path.realpath(root)
    seen: dict[str, str] = {}  # cleaned name -> "dir" | "file" | "link"
    members = 0
    extracted = 0
    current = "(archive header)"
    where = "at the first member"
    size = archive.stat().st_size
    caps = _SizeCaps.of(size, root.parent, max_total_bytes=max_total_bytes, max_ratio=max_ratio,
                        min_free_bytes=min_free_bytes)
    progress = Progress(f"extracting {archive_name}", size, unit="bytes", every=progress_every)
    with open(archive, "rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        compression = next((c for m, c in _MAGIC if magic.startswith(m)), "")
        try:
            tf = tarfile.open(fileobj=raw, mode=f"r:{compression}")
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
            if compression:
                raise PersoncarError(f"corrupt or truncated archive {archive_name}: "
                                     f"{_one_line(e)}") from None
            raise PersoncarError(f"{archive_name} is not a readable .tar.gz/.tgz/.tar archive: "
                                 f"{_one_line(e)}") from None
        tf.errorlevel = 2
        with tf:
            try:
                while True:
                    where = f"after member {current!r}" if members else "at the first member"
                    m = tf.next()
                    if m is None:
                        break
                    current = m.name
                    where = f"at member {current!r}"
                    members += 1
                    if members > max_members:
                        raise _unsafe(m.name, archive_name, f"more than max_members={max_members} "
                                      "members (decompression bomb cap)")
                    m = _check_member(m, archive_name, root_real, seen)
                    if m is None:
                        continue
                    if m.isreg():
                        extracted += m.size
                        if rule := caps.exceeded(extracted):
                            raise _unsafe(m.name, archive_name, f"extracted size would exceed {rule}")
                    tf.extract(m, root_real, set_attrs=True, filter="data")
                    progress.update(raw.tell() - progress.done)
                where = "at the end of the archive"
                # read to the end of the compressed stream: a truncated gzip trailer or garbage
                # after the archive is an error, and what is read still counts toward the cap
                fileobj = tf.fileobj
                assert fileobj is not None
                trailing = 0
                while block := fileobj.read(CHUNK):
                    trailing += len(block)
                    if rule := caps.exceeded(extracted + trailing):
                        raise _unsafe("(end of archive)", archive_name, f"data after the end of the archive "
                                      f"exceeds {rule}")
            except PersoncarError:
                raise
            except tarfile.FilterError as e:
                raise _unsafe(current, archive_name, _one_line(e)) from None
            except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as e:
                raise PersoncarError(f"corrupt or truncated archive {archive_name} {where}: "
                                     f"{_one_line(e)}") from None
            except OSError as e:
                if e.errno is None:  # decompressors report bad data as a bare OSError
                    raise PersoncarError(f"corrupt or truncated archive {archive_name} {where}: "
                                         f"{_one_line(e)}") from None
                if e.errno == errno.ENOSPC:
                    raise PersoncarError(f"no space left on device extracting {archive_name} "
                                         f"(member {current!r}, {extracted} bytes so far)") from None
                raise PersoncarError(f"cannot extract member {current!r} of {archive_name}: "
                                     f"{e.strerror or e}") from None
    progress.finish()
    return members, extracted


def _check_member(m: tarfile.TarInfo, archive_name: str, root_real: str,
                  seen: dict[str, str]) -> tarfile.TarInfo | None:
    """The member with a cleaned name, or None to skip it; raises naming the rule it breaks."""
    name = _clean_member_path(m.name, archive_name)
    if m.ischr() or m.isblk() or m.isfifo():
        raise _unsafe(m.name, archive_name, "device or fifo file")
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        raise _unsafe(m.name, archive_name, f"unsupported member type {m.type!r}")
    if not name:
        if m.isdir():
            return None  # "./": the destination itself
        raise _unsafe(m.name, archive_name, "member has no name")
    kind = "dir" if m.isdir() else ("link" if m.issym() or m.islnk() else "file")
    prev = seen.get(name)
    if prev is not None and not (prev == "dir" and kind == "dir"):
        raise _unsafe(m.name, archive_name, "duplicate member (a later copy would overwrite an earlier one)")
    target = os.path.join(root_real, name)
    # the parent as it really is on disk now: a symlink extracted earlier cannot lead us outside
    if not _within(root_real, os.path.dirname(target)) or (kind != "link" and not _within(root_real, target)):
        raise _unsafe(m.name, archive_name, "path escapes the destination (through a symlink)")
    changes: dict[str, Any] = {"name": name}
    if m.issym():
        if not m.linkname or os.path.isabs(m.linkname):
            raise _unsafe(m.name, archive_name, f"symlink to an absolute path {m.linkname!r}")
        if not _within(root_real, os.path.join(os.path.dirname(target), m.linkname)):
            raise _unsafe(m.name, archive_name, f"symlink target {m.linkname!r} escapes the destination")
    elif m.islnk():
        if os.path.isabs(m.linkname):
            raise _unsafe(m.name, archive_name, f"hardlink to an absolute path {m.linkname!r}")
        parts = [p for p in m.linkname.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise _unsafe(m.name, archive_name, f"hardlink target {m.linkname!r} escapes the destination")
        link = "/".join(parts)
        if not _within(root_real, os.path.join(root_real, link)):
            raise _unsafe(m.name, archive_name, f"hardlink target {m.linkname!r} escapes the destination")
        if seen.get(link) != "file":
            raise _unsafe(m.name, archive_name, f"hardlink target {m.linkname!r} is not an earlier "
                          "regular file of the archive")
        changes["linkname"] = link
    seen[name] = kind
    return m.replace(**changes, deep=False)


def _extract_into(archive: Path, dest: Path, *, src: _Source, digest: str, size: int, reused: bool,
                  max_total_bytes: int, max_members: int, max_ratio: float, min_free_bytes: int,
                  progress_every: float, t0: float) -> dict[str, Any]:
    with atomic_dir(dest, OUTPUTS, flag="--dest") as tmp:
        members, extracted = _extract_members(
            archive, src.archive_name, tmp, max_total_bytes=max_total_bytes,
            max_members=max_members, progress_every=progress_every, max_ratio=max_ratio,
            min_free_bytes=min_free_bytes)
        missing = [rel for rel, ok in ((ANNOTATIONS_REL, (tmp / ANNOTATIONS_REL).is_file()),
                                       (IMAGES_REL + "/", (tmp / IMAGES_REL).is_dir())) if not ok]
        if missing:
            raise PersoncarError(f"archive {src.archive_name} ({src.display}) lacks {' and '.join(missing)}; "
                                 f"expected the layout {IMAGES_REL}/..., {ANNOTATIONS_REL}")
        images = sum(1 for p in (tmp / IMAGES_REL).iterdir() if p.is_file())
        manifest = {
            "source": src.display,
            "sha256": digest,
            "size_bytes": size,
            "archive_name": src.archive_name,
            "members": members,
            "images": images,
            "annotations_file": ANNOTATIONS_REL,
            "images_dir": IMAGES_REL,
            "extracted_bytes": extracted,
            "reused_cache": reused,
            "seconds": round(time.monotonic() - t0, 3),
        }
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    return manifest
