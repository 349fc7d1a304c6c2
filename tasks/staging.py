"""Local stand-ins for remote folders: a stage reads and writes local paths; ``s3://`` inputs are
mirrored down before it runs and its outputs mirrored up when it succeeds (TensorFlow, GX and
pycocotools want local files; the model folder is also sent up after every checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks import storage


class Staging:
    """Local folders standing for remote inputs (mirrored down now) and outputs (mirrored up on
    :meth:`push`, or :meth:`sync` during the stage: the model folder after every checkpoint)."""

    def __init__(self, root: Path, **where: Any) -> None:
        self.root, self.where, self.outputs = root, where, {}  # type: ignore[var-annotated]

    def _local(self, uri: str) -> Path:
        return self.root / hashlib.sha256(uri.encode()).hexdigest()[:12] / uri.rstrip("/").rsplit("/", 1)[-1]

    def input(self, uri: str | None, *, file: bool = False) -> Path | None:
        if uri is None or not storage.is_remote(uri):
            return None if uri is None else storage.local_path(uri)
        if file:
            parent, name = uri.rsplit("/", 1)
            data = storage.read_bytes(uri, **self.where)
            if data is None:
                raise storage.StorageError(f"read {uri} failed: no such key")
            path = self._local(parent) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return path
        local = self._local(uri)
        storage.download_dir(uri, local, **self.where)
        return local

    def output(self, uri: str, *, file: bool = False, keep: bool = False) -> Path:
        """A local stand-in for the folder (or ``file``) ``uri``, mirrored up on :meth:`push`;
        ``keep`` brings the folder's current content down first (a resumed model folder)."""
        if not storage.is_remote(uri):
            return storage.local_path(uri)
        local = self._local(uri)
        if keep and not file:
            storage.download_dir(uri, local, **self.where)
        (local.parent if file else local).mkdir(parents=True, exist_ok=True)
        self.outputs[uri] = (local, file)
        return local

    def sync(self, uri: str) -> None:
        """Send the new files of an output folder now (keeps what is already there)."""
        local, _ = self.outputs[uri]
        storage.upload_dir(local, uri, **self.where)

    def push(self) -> None:
        for uri, (local, file) in self.outputs.items():
            if file:
                parent, name = uri.rsplit("/", 1)
                storage.upload_files([(name, local)], parent, skip_unchanged=False, **self.where)
            else:
                storage.upload_dir(local, uri, delete=True, **self.where)


@contextlib.contextmanager
def staging(**where: Any) -> Iterator[Staging]:
    """A :class:`Staging` in a temp folder; outputs are pushed only when the block succeeds."""
    with tempfile.TemporaryDirectory(prefix="personcar-stage-") as tmp:
        stage = Staging(Path(tmp), **where)
        yield stage
        stage.push()
