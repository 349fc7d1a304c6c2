"""Where training starts: a checkpoint from anywhere, checked against the model, restored by module.

``init_checkpoint`` may be a local path (a checkpoint prefix, a folder holding one, or a
``.tar.gz`` of one), ``s3://`` (staged into the cache through the run's S3 client: TensorFlow 2.20
has no S3 filesystem), ``gs://`` (read by TensorFlow directly) or ``http(s)://`` (downloaded into
the cache once, unpacked safely with tarfile's ``data`` filter). Three checkpoint layouts load:

- this project's own (``personcar train``: ``backbone``, ``decoder`` and ``head`` at the top level
  beside ``model`` and ``optimizer``) and Model Garden's (classification checkpoints hold a
  ``backbone``, RetinaNet checkpoints ``backbone``, ``decoder`` and ``head``);
- the TF2 detection zoo's (OD API ``model/_feature_extractor/...``), converted onto the model on
  the fly by :mod:`tasks.convert_checkpoint`.

A checkpoint that does not fit (another depth, head or class count, missing variables) fails before
any training with one line naming what did not match; a successful restore logs how many variables
came from where.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tasks.errors import PersoncarError, TemporaryError
from tasks.fetch import http_retryable
from tasks.logs import log

MODULES = ("backbone", "decoder", "head")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
MAX_ARCHIVE_BYTES = 8 * 2**30
HTTP_TIMEOUT_S = 60.0


def cache_dir() -> Path:
    """``$PERSONCAR_CACHE_DIR/checkpoints``, else ``~/.cache/personcar/checkpoints``."""
    root = os.environ.get("PERSONCAR_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "personcar") / "checkpoints"


def parse_modules(modules: str | None) -> tuple[str, ...] | None:
    """``backbone`` | ``backbone,decoder`` | ``all`` -> module names; None stays None (auto)."""
    if modules is None:
        return None
    if modules == "all":
        return MODULES
    names = tuple(m.strip() for m in modules.split(",") if m.strip())
    bad = [m for m in names if m not in MODULES]
    if bad or not names:
        raise PersoncarError(f"init_checkpoint_modules {modules!r}: expected backbone, backbone,decoder or all")
    return names


# --------------------------------------------------------------------------- fetching


def _is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _entry(uri: str) -> Path:
    """The cache folder of one checkpoint URI."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:60] or "checkpoint"
    return cache_dir() / f"{name}-{digest}"


def _extract(archive: Path, dest: Path) -> None:
    """Unpack ``archive`` into ``dest`` (replaced on success only) with tarfile's ``data`` filter."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(archive) as tar:
            total = 0
            for member in tar:
                total += max(member.size, 0)
                if total > MAX_ARCHIVE_BYTES:
                    raise PersoncarError(f"{archive}: unpacks to more than {MAX_ARCHIVE_BYTES >> 30} GiB; not a checkpoint")
            tar.extractall(tmp, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.replace(dest)
    except (tarfile.TarError, OSError) as exc:
        raise PersoncarError(f"{archive}: cannot unpack the checkpoint archive ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_http(url: str, dest: Path) -> None:
    part = dest.with_name(dest.name + ".part")
    req = urllib.request.Request(url, headers={"User-Agent": "personcar"})
    log.info("init checkpoint: downloading %s", url)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp, open(part, "wb") as f:
            shutil.copyfileobj(resp, f, length=1 << 20)
    except OSError as exc:  # URLError, HTTPError, timeouts, disk full
        part.unlink(missing_ok=True)
        refused = isinstance(exc, urllib.error.HTTPError) and not http_retryable(exc.code)
        kind = PersoncarError if refused else TemporaryError  # a 404 stays one; a timeout may pass on retry
        raise kind(f"cannot download checkpoint {url}: {exc}") from exc
    part.replace(dest)


def _download_s3(uri: str, dest: Path, where: dict[str, Any]) -> None:
    """A checkpoint prefix's files (``.../ckpt-N.index``, ``.data-*``) or a folder, into ``dest``."""
    from tasks import storage

    parent, name = uri.rstrip("/").rsplit("/", 1)
    names = [n for n in storage.list_names(parent, **where)
             if n.startswith((f"{name}/", f"{name}.index", f"{name}.data-"))]
    if not names:
        raise PersoncarError(f"{uri}: no such checkpoint (no {name}.index and nothing under {name}/)")
    storage.download_dir(parent, dest, names=names, **where)
    log.info("init checkpoint: staged %d files of %s into %s", len(names), uri, dest)


def fetch(uri: str, *, where: dict[str, Any] | None = None) -> str:
    """A checkpoint prefix TensorFlow can read for ``uri`` (local, or ``gs://`` as it is); ``where``:
    how :mod:`tasks.storage` reaches S3 (the AWS connection, an endpoint)."""
    from tasks import storage

    if uri.startswith("gs://") and not _is_archive(uri):
        return find_prefix(uri)
    if uri.startswith("file://"):
        uri = str(storage.local_path(uri))
    entry = _entry(uri)
    if not uri.startswith(("s3://", "gs://", "http://", "https://")):
        path = Path(uri).expanduser()
        if not path.exists() and not Path(f"{path}.index").exists():
            raise PersoncarError(f"init checkpoint {uri}: no such file or folder")
        if not _is_archive(path.name):
            return find_prefix(str(path))
        return _unpacked(entry, lambda dst: shutil.copyfile(path, dst), path.name)
    if uri.startswith("s3://"):
        where = where or {}
        name = uri.rstrip("/").rsplit("/", 1)[1]
        if _is_archive(uri):
            parent = uri.rsplit("/", 1)[0]
            return _unpacked(entry, lambda dst: storage.download_dir(parent, dst.parent, names=[name], **where), name)
        staged = entry / "files"
        _download_s3(uri, staged, where)
        return find_prefix(str(staged / name))  # a ckpt-N prefix (its .index and .data files) or a folder
    if uri.startswith("gs://"):
        import tensorflow as tf

        return _unpacked(entry, lambda dst: tf.io.gfile.copy(uri, str(dst), overwrite=True), uri.rsplit("/", 1)[1])
    return _unpacked(entry, lambda dst: _download_http(uri, dst), uri.rsplit("/", 1)[1].split("?")[0])


def _unpacked(entry: Path, get: Any, name: str) -> str:
    """Download an archive once into ``entry`` and unpack it; reuse both on the next run."""
    done = entry / "unpacked"
    if done.is_dir():
        log.info("init checkpoint: reusing %s", done)
        return find_prefix(str(done))
    entry.mkdir(parents=True, exist_ok=True)
    archive = entry / name
    if not archive.is_file():
        get(archive)
    _extract(archive, done)
    return find_prefix(str(done))


def find_prefix(path: str) -> str:
    """The checkpoint prefix at ``path``: itself, the ``checkpoint`` file's latest, or the shallowest,
    newest ``*.index`` below it."""
    import tensorflow as tf

    if tf.io.gfile.exists(f"{path}.index"):
        return path
    if not tf.io.gfile.isdir(path):
        raise PersoncarError(f"init checkpoint {path}: no such checkpoint (no {Path(path).name}.index)")
    latest = tf.train.latest_checkpoint(path)
    if latest and tf.io.gfile.exists(f"{latest}.index"):
        return latest
    found = [f"{root.rstrip('/')}/{name}" for root, _, files in tf.io.gfile.walk(path)
             for name in files if name.endswith(".index")]
    if not found:
        raise PersoncarError(f"init checkpoint {path}: no checkpoint in it (no *.index file)")

    def order(p: str) -> tuple[int, int]:
        m = re.search(r"-(\d+)\.index$", p)
        return (-p.count("/"), int(m.group(1)) if m else -1)

    return max(found, key=order)[: -len(".index")]


# --------------------------------------------------------------------------- inspecting


def variables(prefix: str) -> dict[str, list[int]]:
    import tensorflow as tf

    try:
        return {name: list(shape) for name, shape in tf.train.list_variables(prefix)}
    except (tf.errors.OpError, ValueError) as exc:
        raise PersoncarError(f"init checkpoint {prefix}: not a readable TensorFlow checkpoint ({exc})") from exc


def checkpoint_format(keys: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """``("od_api" | "model_garden", modules it holds)`` for a checkpoint's variable names."""
    if any(k.startswith("model/_feature_extractor/") for k in keys):
        have = ["backbone"]
        if any(k.startswith("model/_feature_extractor/_fpn_features_generator/") for k in keys):
            have.append("decoder")
        if any(k.startswith("model/_box_predictor/") for k in keys):
            have.append("head")
        return "od_api", tuple(have)
    have = tuple(m for m in MODULES if any(k.startswith(f"{m}/") for k in keys))
    if not have:
        tops = sorted({k.split("/", 1)[0] for k in keys})[:6]
        raise PersoncarError(
            "init checkpoint holds no backbone, decoder or head at its top level (found: "
            f"{', '.join(tops)}); expected a checkpoint of personcar train, Model Garden or the TF2 detection zoo")
    return "model_garden", have


# --------------------------------------------------------------------------- restoring


def _mismatch_line(prefix: str, exc: BaseException, modules: tuple[str, ...]) -> str:
    text = " ".join(str(exc).split())
    shape = re.search(r"Received incompatible tensor with shape (\([^)]*\)) when attempting to restore variable "
                      r"with shape (\([^)]*\)) and name ([^:\s]+)", text)
    if shape:
        return (f"init checkpoint {prefix} does not fit the model: {shape.group(3)} is {shape.group(1)} in the "
                f"checkpoint but {shape.group(2)} in the model (another depth, head, anchors or class count?)")
    unbound = re.findall(r"<tf\.Variable '([^']+)' shape=\(([^)]*)\)", text)
    if unbound:
        names = ", ".join(f"{n.removesuffix(':0')} ({s})" for n, s in unbound[:3])
        return (f"init checkpoint {prefix} does not fit the model: {len(unbound)} variables of "
                f"{'+'.join(modules)} have no value in it, e.g. {names} (another depth or architecture?)")
    return f"init checkpoint {prefix} does not fit the model's {'+'.join(modules)}: {text[:300]}"


def restore_modules(model: Any, prefix: str, modules: tuple[str, ...]) -> int:
    """Restore ``modules`` of ``model`` from a personcar / Model Garden checkpoint; the variable count."""
    import tensorflow as tf

    objs = {m: getattr(model, m) for m in modules}
    ckpt = tf.train.Checkpoint(**objs)
    try:
        status = ckpt.read(prefix)
        status.expect_partial()
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        line = _mismatch_line(prefix, exc, modules)
        _expect_partial(exc)
        raise PersoncarError(line) from None  # the line carries what TensorFlow's error said
    return sum(len(o.variables) for o in objs.values())


def _expect_partial(exc: BaseException) -> None:
    """Mark a restore that failed half-way as partial. Its pending values stay attached to the model's
    variables, and TensorFlow would list every one of them (hundreds of log lines after the error's
    one line) whenever the model is collected, even at exit."""
    try:
        from tensorflow.python.checkpoint.checkpoint import _CheckpointRestoreCoordinator
    except ImportError:  # TensorFlow's private class moved: the error line still stands, only louder
        return
    tb = exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, _CheckpointRestoreCoordinator):
                value.expect_partial = True
        tb = tb.tb_next


def initialize(model: Any, model_cfg: Any, uri: str, modules: str | None, *,
               where: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load ``model``'s modules from the checkpoint at ``uri`` (``model_cfg``: its Model Garden model
    config); what was loaded, for the training summary."""
    prefix = fetch(uri, where=where)
    keys = variables(prefix)
    fmt, have = checkpoint_format(keys)
    wanted = parse_modules(modules) or have
    missing = [m for m in wanted if m not in have]
    if missing:
        raise PersoncarError(f"init checkpoint {uri} has no {', '.join(missing)} (it holds {', '.join(have)}); "
                             f"set init_checkpoint_modules to {'backbone,decoder' if 'decoder' in have else 'backbone'}")
    if fmt == "od_api":
        from tasks.convert_checkpoint import convert_into

        report = convert_into(model, prefix, wanted, model_cfg, keys=keys)
        count = report["variables"]
    else:
        count = restore_modules(model, prefix, wanted)
        report = {}
    log.info("init checkpoint: restored %d variables of the %s from %s (%s format)", count, "+".join(wanted),
             uri, fmt)
    return {"uri": uri, "prefix": prefix, "format": fmt, "modules": list(wanted), "variables": count, **report}
