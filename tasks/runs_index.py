"""The published indexes (``DEST/runs.json``, ``DEST/sweeps.json``): read, and updated without
losing concurrent updates.

Publishes of different runs may run at the same time (parallel DAG runs, backfills). On S3 an index
is updated by optimistic concurrency: read it with its ETag, change it, and write it back only if
it is unchanged (conditional writes: ``IfMatch=<etag>``, or ``IfNoneMatch='*'`` when creating it);
on a conflict, re-read and try again (bounded, with jittered backoff). A server that rejects
conditional writes as not implemented gets a read-modify-write with an ETag check before and a
read-back after. Local destinations take an exclusive ``fcntl`` lock on a lock file beside the
index and replace it by an atomic rename. ``latest/`` is refreshed under a lock: that ``fcntl``
lock locally, a lease object taken by conditional writes on S3 (:func:`s3_lease`). Kept by hand:
no library offers a compare-and-swap JSON document on both S3 and a local folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks import storage
from tasks.artifacts import write_json_atomic
from tasks.errors import PersoncarError, TemporaryError
from tasks.logs import log

INDEX_NAME = "runs.json"
LOCK_NAME = ".runs.json.lock"
#: Attempts at a conflicting index update before giving up.
MAX_INDEX_ATTEMPTS = 40
#: An S3 lease (:func:`s3_lease`) lasts this long unless released; a waiter gives up after LEASE_WAIT_S.
LEASE_TTL_S, LEASE_WAIT_S = 900.0, 600.0


def load_index(dest: str, *, endpoint_url: str | None = None, conn_id: str | None = None,
               name: str = INDEX_NAME) -> list[dict]:
    """The entries of ``<dest>/runs.json`` (or of the index ``name``, oldest first); ``[]`` when nothing
    is published yet."""
    uri = storage.join_uri(normalize_dest(dest), name)
    return _parse_index(storage.read_bytes(uri, endpoint_url=endpoint_url, conn_id=conn_id), uri)


def normalize_dest(dest: str | os.PathLike[str]) -> str:
    """``s3://bucket/prefix`` as given, local destinations as an absolute ``file://`` URI."""
    text = str(dest).strip()
    if not text:
        raise PersoncarError("publish destination is empty")
    if storage.is_remote(text):
        storage.split_s3(text)
        return text.rstrip("/")
    return storage.local_path(text).expanduser().resolve().as_uri()


def update_index(dest: str, change: Callable[[list[dict]], list[dict]], *, conn_id: str | None = None,
                 endpoint_url: str | None = None, name: str = INDEX_NAME) -> list[dict]:
    """Apply ``change`` to the entries of ``<dest>/runs.json`` (or of the index ``name``) without
    losing concurrent updates.

    ``change`` gets the current entries and returns the new ones; it may be called several times
    (once per attempt) and must not have other side effects. Returns the entries written.
    """
    dest = normalize_dest(dest)
    if storage.is_remote(dest):
        return _update_index_s3(dest, change, storage.s3_client(endpoint_url, conn_id=conn_id), name)
    return _update_index_local(storage.local_path(dest), change, name)


def put_entry(entries: list[dict], entry: dict, key: str) -> list[dict]:
    """``entries`` with ``entry`` in the place of the first one of the same ``entry[key]`` (later
    ones of it dropped), or appended: publishing again replaces in place."""
    same = [i for i, e in enumerate(entries) if e.get(key) == entry[key]]
    if not same:
        return [*entries, entry]
    return [entry if i == same[0] else e for i, e in enumerate(entries) if i not in same[1:]]


def _parse_index(raw: bytes | None, uri: str) -> list[dict]:
    if raw is None:
        return []
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise PersoncarError(f"{uri}: not valid JSON ({exc}); fix or remove it") from exc
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        data = data["runs"]
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise PersoncarError(f"{uri}: expected a JSON list of run entries")
    return data


def _dump_index(entries: list[dict]) -> bytes:
    return (json.dumps(entries, indent=2) + "\n").encode("utf-8")


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** attempt)))


def _update_index_s3(dest: str, change: Callable[[list[dict]], list[dict]], client: Any,
                     name: str = INDEX_NAME) -> list[dict]:
    from botocore.exceptions import ClientError

    bucket, prefix = storage.split_s3(dest)
    key = f"{prefix}/{name}" if prefix else name
    uri = f"s3://{bucket}/{key}"
    conditional = True
    for attempt in range(MAX_INDEX_ATTEMPTS):
        with storage.storage_errors(uri, "read"):
            raw, etag = _get_object(client, bucket, key)
        entries = change(_parse_index(raw, uri))
        body = _dump_index(entries)
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            with storage.storage_errors(uri, "write"):
                try:
                    if conditional:
                        client.put_object(Bucket=bucket, Key=key, Body=body,
                                          ContentType="application/json", **cond)
                    elif _etag_unchanged(client, bucket, key, etag):
                        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
                        if _read_back_matches(client, bucket, key, body):
                            return entries
                        raise _Conflict
                    else:
                        raise _Conflict
                except ClientError as exc:
                    if _is_conflict(exc):
                        raise _Conflict from exc
                    if conditional and _not_implemented(exc):
                        log.warning("%s: the S3 server does not support conditional writes; "
                                    "falling back to read-modify-write with ETag checks", uri)
                        conditional = False
                        raise _Conflict from exc
                    raise
            return entries
        except _Conflict:
            log.debug("%s changed while updating it (attempt %d); retrying", uri, attempt + 1)
            _backoff(attempt)
    raise TemporaryError(f"{uri}: could not update the index after {MAX_INDEX_ATTEMPTS} attempts: "
                         "other publishers kept changing it")


class _Conflict(Exception):
    """The index changed between our read and our write."""


def _status(exc: Any) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _is_conflict(exc: Any) -> bool:
    """A conditional write refused: the object is not (or no longer) as the condition said."""
    return storage.error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict") or _status(exc) in (409, 412)


def _not_implemented(exc: Any) -> bool:
    return storage.error_code(exc) == "NotImplemented" or _status(exc) == 501


def _etag_unchanged(client: Any, bucket: str, key: str, etag: str | None) -> bool:
    from botocore.exceptions import ClientError

    try:
        current = client.head_object(Bucket=bucket, Key=key)["ETag"]
    except ClientError as exc:
        if storage.error_code(exc) in ("NoSuchKey", "404", "NotFound"):
            return etag is None
        raise
    return current == etag


def _read_back_matches(client: Any, bucket: str, key: str, body: bytes) -> bool:
    time.sleep(0.05)
    return client.get_object(Bucket=bucket, Key=key)["Body"].read() == body


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def s3_lease(uri: str, *, owner: str, ttl_s: float = LEASE_TTL_S, wait_s: float = LEASE_WAIT_S,
             endpoint_url: str | None = None, conn_id: str | None = None) -> Iterator[None]:
    """Hold the S3 object ``uri`` as an exclusive lease while the block runs (the S3 ``file_lock``).

    Taken by a conditional create (``IfNoneMatch='*'``) of ``{"owner", "expires_at"}``; a lease
    past ``expires_at`` (its holder died) is taken over by a conditional overwrite of that version
    (``IfMatch``). Waits up to ``wait_s`` for a live lease, then fails naming its holder (a
    :class:`TemporaryError`: a retry may find it free). Released by
    deleting it when it is still ours. A server without conditional writes gets no lease (a
    warning). The block must finish within ``ttl_s``.
    """
    from botocore.exceptions import ClientError

    client = storage.s3_client(endpoint_url, conn_id=conn_id)
    bucket, key = storage.split_s3(uri)
    token = f"{owner} {os.getpid()} {random.getrandbits(64):016x}"
    deadline, attempt, held = time.monotonic() + wait_s, 0, True
    while True:
        body = json.dumps({"owner": token, "expires_at": time.time() + ttl_s}).encode()
        with storage.storage_errors(uri, "lock"):
            try:
                client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
                break
            except ClientError as exc:
                if _not_implemented(exc):
                    log.warning("%s: the S3 server does not support conditional writes; no lease taken", uri)
                    held = False
                    break
                if not _is_conflict(exc):
                    raise
            holder, etag = _read_lease(client, bucket, key)
            if holder is not None and holder.get("expires_at", 0) < time.time():
                try:
                    client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=etag)
                    log.warning("%s: took over the expired lease of %s", uri, holder.get("owner"))
                    break
                except ClientError as exc:
                    if not _is_conflict(exc):
                        raise
        if time.monotonic() > deadline:
            raise TemporaryError(f"{uri}: held by {(holder or {}).get('owner', 'another publisher')} for more than "
                                 f"{wait_s:.0f} s; a lease left by a publish that died expires {ttl_s:.0f} s "
                                 "after it was taken")
        _backoff(attempt)
        attempt = min(attempt + 1, 6)
    try:
        yield
    finally:
        with storage.storage_errors(uri, "unlock"):
            if held and (_read_lease(client, bucket, key)[0] or {}).get("owner") == token:
                client.delete_object(Bucket=bucket, Key=key)


def _get_object(client: Any, bucket: str, key: str) -> tuple[bytes | None, str | None]:
    """An object's body and ETag; ``(None, None)`` when there is none."""
    from botocore.exceptions import ClientError

    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if storage.error_code(exc) in ("NoSuchKey", "404"):
            return None, None
        raise
    return obj["Body"].read(), obj["ETag"]


def _read_lease(client: Any, bucket: str, key: str) -> tuple[dict | None, str | None]:
    """The lease's ``{"owner", "expires_at"}`` and ETag; an unreadable one counts as expired."""
    raw, etag = _get_object(client, bucket, key)
    if raw is None:
        return None, None
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    return (doc if isinstance(doc, dict) else {"owner": "an unreadable lease", "expires_at": 0}), etag


def _update_index_local(root: Path, change: Callable[[list[dict]], list[dict]], name: str = INDEX_NAME) -> list[dict]:
    index = root / name
    with file_lock(root / (LOCK_NAME if name == INDEX_NAME else f".{name}.lock")):
        raw = index.read_bytes() if index.exists() else None
        entries = change(_parse_index(raw, index.as_uri()))
        write_json_atomic(index, entries)
    return entries
