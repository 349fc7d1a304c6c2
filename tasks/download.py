"""Download stage: fetch the dataset archive, verify its sha256, extract it safely into ``DEST/trainval``.

Fetch: boto3 ``get_object`` for ``s3://`` (unsigned only when ``anonymous`` is True, or None and no
credentials exist) and urllib for ``http(s)://`` stream into ``<cache>/<entry>.part``, hashed on the way
and renamed once complete; local archives are hashed in place. A verified archive is reused while its
sha256 (or, none given, the remote ETag and size) still matches. Retries belong to Airflow (the task's
``retries``): a failed attempt ends with one line, DEST untouched, and the next resumes the ``.part``
with a Range request tied to the ETag (If-Range / If-Match), so no changed object is stitched on.

Extract (:mod:`tasks.extract`): ``tarfile``'s ``data`` filter plus member, size, ratio and free-disk caps,
into a temp folder that replaces DEST in one rename once the production layout is there (``atomic_dir``).
The sources (:mod:`tasks.fetch`) do the ranged reads; this module owns the cache and the resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from tasks import extract, fetch
from tasks.extract import CHUNK
from tasks.artifacts import StageOutputs, atomic_dir, check_output_dir, write_json_atomic
from tasks.errors import PersoncarError, one_line
from tasks.logs import Progress, log

ANNOTATIONS_REL = "trainval/annotations/bbox-annotations.json"
IMAGES_REL = "trainval/images"
MANIFEST_NAME = "download_manifest.json"
OUTPUTS = StageOutputs("download", MANIFEST_NAME, keys=("sha256", "archive_name"), names=("trainval", MANIFEST_NAME))
_SECRET_QUERY = re.compile(r"signature|credential|token|secret|password|sig$|key$", re.IGNORECASE)


class _Source(NamedTuple):
    kind: str  # "s3" | "http" | "local"
    uri: str  # the cache key, without secrets (a re-signed URL is the same archive)
    display: str  # for logs, errors and the manifest
    archive_name: str
    fetch: str = ""  # the URL as given, secrets included (http)
    path: Path | None = None


def default_cache_dir() -> Path:
    """``$PERSONCAR_CACHE_DIR``, else ``~/.cache/personcar/downloads``."""
    env = os.environ.get("PERSONCAR_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "personcar" / "downloads"


def download_dataset(
    source: str, dest: str | os.PathLike[str], *, sha256: str | None = None, endpoint_url: str | None = None,
    aws_access_key_id: str | None = None, aws_secret_access_key: str | None = None,
    aws_session_token: str | None = None, region_name: str | None = None, anonymous: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None, max_total_bytes: int = 20 * 2**30, max_members: int = 200_000,
    max_ratio: float = 100.0, min_free_bytes: int = 256 * 2**20, progress_every: float = 5.0,
    session: Any = None,
) -> dict[str, Any]:
    """Fetch, verify and safely extract the archive ``source`` into ``dest``, replaced in one rename on success.

    Returns the manifest it writes to ``dest/download_manifest.json``. ``anonymous``: True forces
    unsigned S3 requests, False requires credentials, None signs when credentials are given or found.
    ``session``: a boto3 session to sign S3 requests with (the Airflow connection's, from its hook).
    Extraction stops at ``max_members`` members, ``max_total_bytes`` bytes, ``max_ratio`` times the
    archive's size, or before less than ``min_free_bytes`` would stay free on the disk.
    """
    t0, expected = time.monotonic(), (sha256 or "").strip().lower() or None
    if expected and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise PersoncarError(f"sha256 must be 64 hexadecimal characters, got {sha256!r}")
    if max_total_bytes <= 0 or max_members <= 0 or not max_ratio > 0 or min_free_bytes < 0:
        raise PersoncarError("max_total_bytes, max_members and max_ratio must be positive, min_free_bytes >= 0")
    src, dest = _parse_source(source), Path(dest).expanduser().absolute()
    cache = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser().absolute()
    for inner, what in ((cache, f"cache folder {cache}"), (src.path, f"archive {src.path}")):
        if inner is not None and (os.path.realpath(inner) + os.sep).startswith(os.path.realpath(dest) + os.sep):
            raise PersoncarError(f"{what} is inside dest {dest}, which is replaced as a whole; move one of them")
    check_output_dir(dest, OUTPUTS, flag="--dest")
    if endpoint_url and src.kind != "s3":
        log.warning("endpoint_url %s ignored: it only applies to s3:// sources", endpoint_url)
    log.info("download_dataset: source %s -> %s (cache %s)", src.display, dest, cache)
    key = hashlib.sha256(src.uri.encode("utf-8")).hexdigest()[:20]
    entry = cache / f"{key}-{re.sub(r'[^A-Za-z0-9._-]', '_', src.archive_name)[:80]}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(Path(f"{entry}.lock"), src.display):
            remote = None if src.kind == "local" else fetch.Http(src) if src.kind == "http" else fetch.S3(
                src, endpoint_url, aws_access_key_id, aws_secret_access_key, aws_session_token, region_name, anonymous,
                session)
            found = _hash_local(src, entry, expected, progress_every) if remote is None else \
                _cached(remote, src, entry, expected) or _download(remote, src, entry, expected, progress_every)
            manifest = _extract_into(*found, dest, src, (max_total_bytes, max_ratio, min_free_bytes), max_members,
                                     progress_every, t0)
    except OSError as exc:  # disk full, permissions: a user-actionable failure, not a traceback
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise PersoncarError(f"cannot download {src.display}: {exc.strerror or exc}{where}") from exc
    log.info("download_dataset: %s -> %s: %d members, %d images, %.1f MB extracted in %.1f s%s", src.display, dest,
             manifest["members"], manifest["images"], manifest["extracted_bytes"] / 1e6, manifest["seconds"],
             " (cached archive reused)" if manifest["reused_cache"] else "")
    return manifest


# -- sources and the cache -------------------------------------------------------------------------

def _parse_source(source: str) -> _Source:
    s = (source or "").strip()
    scheme = s.split("://", 1)[0].lower() if "://" in s else ""
    if not s:
        raise PersoncarError("source is empty: give s3://bucket/key, https://..., file://... or a path")
    if scheme == "s3":
        bucket, _, key = s[5:].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise PersoncarError(f"S3 source must be s3://bucket/key of an archive, got {s!r}")
        return _Source("s3", f"s3://{bucket}/{key}", f"s3://{bucket}/{key}", _name(key))
    if scheme in ("http", "https"):
        if not urlsplit(s).hostname:
            raise PersoncarError(f"URL has no host: {_redact(s)!r}")
        return _Source("http", _redact(s), _redact(s), _name(unquote(urlsplit(s).path)), fetch=s)
    if scheme not in ("", "file"):
        raise PersoncarError(f"unsupported source scheme {scheme}:// in {_redact(s)!r}; "
                             "expected s3://, https://, http://, file:// or a path")
    if scheme and urlsplit(s).netloc not in ("", "localhost"):
        raise PersoncarError(f"file:// URI must name a local path (file:///path), got {s!r}")
    path = (Path(urllib.request.url2pathname(urlsplit(s).path)) if scheme else Path(s).expanduser()).absolute()
    return _Source("local", f"file://{os.path.realpath(path)}", s, _name(path.name), path=path)


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or "archive"


def _redact(uri: str) -> str:
    """Hide passwords and signed-URL secrets from logs, errors, manifests and cache keys."""
    parts = urlsplit(uri)
    userinfo, _, host = parts.netloc.rpartition("@")
    netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else parts.netloc
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*/")
    return urlunsplit(parts._replace(netloc=netloc, query=query if pairs else parts.query))


@contextlib.contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """One process at a time per source: two Airflow tasks must not grow the same .part file."""
    with open(path, "a+b") as f:  # closing it releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another download of %s to finish", what)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read_json(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        obj = json.loads(path.read_text(encoding="utf-8"))
        return obj if isinstance(obj, dict) else {}
    return {}


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()  # ctime cannot be set from user space: any write, rename over or chmod changes it
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _recorded(entry: Path, src: _Source, archive: Path) -> dict[str, Any]:
    """The cache record of ``archive`` while the file is still the one it describes, else {}."""
    rec = _read_json(Path(f"{entry}.json"))
    ok = archive.is_file() and rec.get("source") == src.uri and rec.get("sha256")
    return rec if ok and rec.get("fingerprint") == _fingerprint(archive) else {}


def _unlink(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _hash_file(path: Path, what: str, progress_every: float) -> Any:
    h, progress = hashlib.sha256(), Progress(what, path.stat().st_size, unit="bytes", every=progress_every)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            progress.update(len(block))
    progress.finish()
    return h


def _hash_local(src: _Source, entry: Path, expected: str | None, progress_every: float) -> tuple[Path, str, int, bool]:
    """A local archive is hashed in place, once: the hash is recorded against the file's identity."""
    assert src.path is not None
    if not src.path.is_file():
        raise PersoncarError(f"source {src.display} is not a file (expected a .tar.gz/.tgz/.tar archive)"
                             if src.path.exists() else f"archive not found: {src.display}")
    fp, digest = _fingerprint(src.path), _recorded(entry, src, src.path).get("sha256")
    if reused := digest is not None:
        log.info("archive %s unchanged since it was hashed (sha256 %s): not hashing again", src.display, digest)
    else:
        digest = _hash_file(src.path, f"hashing {src.display}", progress_every).hexdigest()
        if _fingerprint(src.path) == fp:  # not modified while it was read
            write_json_atomic(Path(f"{entry}.json"), {"source": src.uri, "sha256": digest, "fingerprint": fp})
    if expected and digest != expected:
        raise PersoncarError(f"sha256 mismatch for {src.display}: expected {expected}, got {digest} ({fp[2]} bytes)")
    return src.path, digest, fp[2], reused


# -- remote archives -------------------------------------------------------------------------------

def _cached(remote: Any, src: _Source, entry: Path, expected: str | None) -> tuple[Path, str, int, bool] | None:
    """The archive an earlier run verified, when it still is what this run asks for."""
    if not (rec := _recorded(entry, src, entry)):
        if entry.exists():
            log.warning("cached archive %s changed since it was verified: fetching again", entry)
        _unlink(entry, Path(f"{entry}.json"))
        return None
    digest, size = rec["sha256"], entry.stat().st_size
    if expected:
        fresh, why = expected == digest, f"sha256 {digest}, expected {expected}"
    else:  # no checksum asked for: reuse while the remote object is unchanged
        try:
            probe = remote.open(0, None, probe=True)
        except fetch.Unreachable as exc:
            log.warning("cannot check %s for changes (%s); reusing the cached archive downloaded %s (sha256 %s)",
                        src.display, exc, rec.get("downloaded_at", "earlier"), digest)
            return entry, digest, size, True
        probe.stream.close()
        same_version = probe.validator is None or rec.get("validator") in (None, probe.validator)
        fresh = probe.total in (None, size) and same_version
        why = f"size {size} -> {probe.total}, version {rec.get('validator')} -> {probe.validator}"
    if fresh:
        log.info("reusing the %s cached archive %s for %s (sha256 %s): not fetching again",
                 "verified" if expected else "unchanged", entry, src.display, digest)
        return entry, digest, size, True
    log.info("cached archive for %s is out of date (%s): fetching again", src.display, why)
    _unlink(entry, Path(f"{entry}.json"))
    return None


def _download(remote: Any, src: _Source, entry: Path, expected: str | None,
              progress_every: float) -> tuple[Path, str, int, bool]:
    """Stream the object into ``<entry>.part`` (resuming what an earlier attempt left), verify it, rename it."""
    part, part_meta = Path(f"{entry}.part"), Path(f"{entry}.part.json")
    meta = _read_json(part_meta)
    total, validator = meta.get("total"), meta.get("validator")
    size = part.stat().st_size if part.exists() and meta.get("source") == src.uri and validator and total else 0
    body = None
    if 0 < size < total:  # never without a validator: the part could be of another version
        log.info("partial download of %s in the cache: resuming at byte %d of %d", src.display, size, total)
        try:
            body = remote.open(size, validator)
        except fetch.Changed as exc:
            log.warning("%s: %s; starting again from byte 0", src.display, exc)
    body = body or remote.open(0, None)
    with contextlib.closing(body.stream):
        if body.offset not in (0, size):
            raise PersoncarError(f"cannot download {src.display}: asked for byte {size}, got byte {body.offset}")
        if size and not body.offset:
            log.info("%s: the server sent the whole object instead of bytes %d-; starting again from byte 0",
                     src.display, size)
        elif size and body.total != total:  # a server that honours Range but not If-Range / If-Match
            _unlink(part, part_meta)
            raise fetch.Changed(f"cannot download {src.display}: its size changed from {total} to {body.total} bytes "
                           "since the partial download, which was deleted; the next run starts again")
        size, validator = body.offset, body.validator or validator
        write_json_atomic(part_meta, {"source": src.uri, "validator": validator, "total": body.total})
        h = _hash_file(part, f"hashing the partial {part.name}", progress_every) if size else hashlib.sha256()
        progress = Progress(f"downloading {src.display}", body.total, unit="bytes", every=progress_every, done=size)
        with open(part, "ab" if size else "wb") as f:
            while body.total is None or size < body.total:
                kept = f"; {size} bytes kept in the cache, the next run resumes" if size else ""
                try:
                    chunk = body.stream.read(CHUNK if body.total is None else min(CHUNK, body.total - size))
                except remote.errors as exc:
                    raise fetch.Unreachable(f"cannot download {src.display}: connection lost: "
                                             f"{type(exc).__name__}: {one_line(exc)}{kept}") from exc
                if not chunk and body.total is not None:
                    raise fetch.Unreachable(f"cannot download {src.display}: connection closed after {size} of "
                                             f"{body.total} bytes{kept}")
                if not chunk:
                    break
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
                progress.update(len(chunk))
    progress.finish()
    if expected and h.hexdigest() != expected:
        _unlink(part, part_meta)
        raise PersoncarError(f"sha256 mismatch for {src.display}: expected {expected}, got {h.hexdigest()} "
                             f"({size} bytes); the downloaded file was deleted")
    os.replace(part, entry)
    write_json_atomic(Path(f"{entry}.json"), {
        "source": src.uri, "sha256": h.hexdigest(), "validator": validator, "fingerprint": _fingerprint(entry),
        "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _unlink(part_meta)
    log.info("downloaded %s: %d bytes, sha256 %s%s", src.display, size, h.hexdigest(),
             " (matches the expected checksum)" if expected else "")
    return entry, h.hexdigest(), size, False


def _extract_into(archive: Path, digest: str, size: int, reused: bool, dest: Path, src: _Source,
                  caps: tuple[int, float, int], max_members: int, progress_every: float, t0: float) -> dict[str, Any]:
    with atomic_dir(dest, OUTPUTS, flag="--dest") as tmp:
        (total, ratio, keep), free = caps, shutil.disk_usage(tmp.parent).free
        rules = [(total, f"max_total_bytes={total} (decompression bomb cap)"),
                 (int(ratio * max(size, 1)), f"max_ratio={ratio:g} times the archive's {size} bytes (decompression "
                  "bomb cap)"),
                 (max(free - keep, 0), f"the free disk space ({free} bytes free at {tmp.parent}, min_free_bytes={keep} "
                  "kept)")]
        members, extracted = extract.extract_members(archive, src.archive_name, tmp, rules, max_members, progress_every)
        missing = [rel for rel, ok in ((ANNOTATIONS_REL, (tmp / ANNOTATIONS_REL).is_file()),
                                       (IMAGES_REL + "/", (tmp / IMAGES_REL).is_dir())) if not ok]
        if missing:
            raise PersoncarError(f"archive {src.archive_name} ({src.display}) lacks {' and '.join(missing)}; "
                                 f"expected the layout {IMAGES_REL}/..., {ANNOTATIONS_REL}")
        manifest = {
            "source": src.display, "sha256": digest, "size_bytes": size, "archive_name": src.archive_name,
            "members": members, "images": sum(1 for p in (tmp / IMAGES_REL).iterdir() if p.is_file()),
            "annotations_file": ANNOTATIONS_REL, "images_dir": IMAGES_REL, "extracted_bytes": extracted,
            "reused_cache": reused, "seconds": round(time.monotonic() - t0, 3),
        }
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    return manifest
