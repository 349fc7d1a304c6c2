"""Run folders, atomic writes and the rule for replacing an output folder.

Every stage writes to ``<artifact root>/<run id>/<stage>/``. Outputs are built in a sibling temp
folder and renamed into place only when complete, so a failed or re-run stage never leaves a
half-written or duplicated result.

Because an output folder is replaced as a whole, a stage replaces only a folder that is absent,
empty, or its own: one holding the stage's marker file (its manifest or report, recognised by
content, not only by name) or nothing but entries the stage itself writes. Anything else (a
user's folder, another stage's output, a file, a symbolic link, the current folder or one that
contains it) is refused with one line naming the folder, before any work is done and again
before the rename.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import PersoncarError


def safe_run_id(run_id: str) -> str:
    """A folder name for a run id, unique per run id.

    Airflow run ids contain ':' and '+' (``scheduled__2026-11-23T00:00:00+00:00``). Characters
    outside ``[A-Za-z0-9._-]`` become '_', and a short hash of the original id is appended when
    anything was replaced, so ``a:b`` and ``a_b`` never share a folder. Safe names map to themselves.
    """
    out = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in run_id)
    if out != run_id:
        out = f"{out}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"
    if not out or out in {".", ".."}:
        raise PersoncarError(f"run id {run_id!r} cannot name a folder")
    return out


@dataclass(frozen=True)
class StageOutputs:
    """How a stage recognises an output folder as its own (and so may replace it).

    ``marker``: a file the stage always writes, relative to the folder; as JSON it must hold
    ``keys``, otherwise its first 4 KiB must contain ``text`` (a same-named file of someone else's
    is not enough). ``names``: glob patterns of every top-level entry the stage writes; a folder
    holding nothing else (an older or partial output of the stage) is its own too.
    """

    stage: str
    marker: str | None = None
    keys: tuple[str, ...] = ()
    text: str | None = None
    names: tuple[str, ...] = ()

    def has_marker(self, folder: Path) -> bool:
        if self.marker is None:
            return False
        path = folder / self.marker
        if path.is_symlink() or not path.is_file():
            return False
        try:
            if self.keys:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
                return isinstance(doc, dict) and all(k in doc for k in self.keys)
            if self.text is not None:
                with open(path, "rb") as f:
                    return self.text.encode() in f.read(4096)
        except (OSError, ValueError):
            return False
        return True

    def foreign(self, entries: list[str]) -> list[str]:
        """The entries that are not among the stage's own names."""
        return [e for e in entries if not any(fnmatch.fnmatchcase(e, p) for p in self.names)]


def check_output_dir(folder: str | os.PathLike[str], outputs: StageOutputs | None, *,
                     owned: bool = False, flag: str = "--out", inputs: tuple[Path, ...] = ()) -> Path:
    """The absolute path of ``folder`` when the stage may replace it; else a one-line PersoncarError.

    Replaceable: absent, an empty folder, a folder of the stage's own (see :class:`StageOutputs`),
    or ``owned`` (the caller knows it from elsewhere, e.g. an index). ``outputs=None`` allows only
    absent or empty folders. Never one of the stage's ``inputs``, or a folder holding one.
    """
    resolved = Path(folder).resolve()
    for given in inputs:
        if given.resolve() == resolved or resolved in given.resolve().parents:
            raise PersoncarError(f"{flag} {folder} would replace the input {given}: choose a separate folder")
    path = Path(os.path.abspath(folder))
    stage = outputs.stage if outputs is not None else "this stage"
    if path == Path(path.anchor):
        raise PersoncarError(f"{flag} {folder}: the filesystem root cannot be an output folder")
    if path.is_symlink():
        raise PersoncarError(f"{flag} {folder} is a symbolic link: give the folder itself "
                             f"(personcar {stage} replaces its output folder as a whole)")
    if not path.exists():
        return path
    if not path.is_dir():
        raise PersoncarError(f"{flag} {folder} exists and is not a folder: give a new or empty folder")
    try:
        cwd = Path(os.getcwd())
    except OSError:  # the current folder itself was removed
        cwd = Path("/nonexistent")
    if path == cwd or path in cwd.parents:  # replacing it would leave the shell in a deleted folder
        raise PersoncarError(f"{flag} {folder} is (or contains) the current folder, which personcar {stage} "
                             "would replace as a whole: give a folder of its own, e.g. a new subfolder")
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise PersoncarError(f"{flag} {folder}: cannot list the folder: {exc.strerror or exc}") from exc
    if owned or not entries:
        return path
    if outputs is not None and (outputs.has_marker(path) or not outputs.foreign(entries)):
        return path
    others = outputs.foreign(entries) if outputs is not None else entries
    raise not_owned(folder, stage, others[0], flag=flag)


def not_owned(folder: str | os.PathLike[str], stage: str, example: str, *, flag: str = "--out") -> PersoncarError:
    """The one-line refusal for an output folder holding what the stage did not write."""
    return PersoncarError(f"{flag} {folder} holds files that personcar {stage} did not write "
                          f"(e.g. {example!r}); it replaces its output folder as a whole: give a new "
                          "or empty folder, or one it wrote before")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], outputs: StageOutputs | None = None, *,
               owned: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` in one rename.

    ``final`` must be replaceable by :func:`check_output_dir` (checked before the temp folder is
    made). On any exception the temp folder is removed and ``final`` is left as it was.
    """
    final = check_output_dir(final, outputs, owned=owned, flag=flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like mkdir's
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write JSON to ``path`` through a temp file and a rename."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=indent) + "\n").encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file beside it and a rename (mode as ``open`` gives)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
