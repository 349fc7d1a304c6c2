"""Safe extraction of a dataset archive: ``tarfile``'s ``data`` filter plus the project's member checks and caps.

The project keeps its own member checks because the filter strips absolute names instead of refusing them,
passes ``..`` that stays inside, and knows nothing of duplicate members or hardlinks to members not extracted
before. Caps (member count, extracted bytes, ratio to the archive, free disk) stop decompression bombs.
"""

from __future__ import annotations

import lzma
import os
import tarfile
import zlib
from pathlib import Path

from tasks.errors import PersoncarError, one_line
from tasks.logs import Progress

CHUNK = 1 << 20
_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)  # an OSError without errno: bad data
_FILTER_RULES = {  # the data filter's refusals, in the words of the project's own checks
    tarfile.AbsoluteLinkError: "{kind} to an absolute path {link!r}",
    tarfile.LinkOutsideDestinationError: "{kind} target {link!r} escapes the destination",
    tarfile.OutsideDestinationError: "path escapes the destination (through a symlink)",
    tarfile.SpecialFileError: "device or fifo file",
}


def _unsafe(name: str, archive_name: str, rule: str) -> PersoncarError:
    return PersoncarError(f"unsafe archive member {name!r} in {archive_name}: {rule}")


def _check_member(m: tarfile.TarInfo, archive_name: str, seen: dict[str, str]) -> tarfile.TarInfo | None:
    """The member under its cleaned name (None: skip it); refuses what the data filter would let through."""
    parts = [p for p in m.name.split("/") if p not in ("", ".")]
    name, kind = "/".join(parts), "dir" if m.isdir() else "link" if m.issym() or m.islnk() else "file"
    if m.name.startswith("/") or os.path.isabs(m.name):
        raise _unsafe(m.name, archive_name, "absolute path")
    if ".." in parts:
        raise _unsafe(m.name, archive_name, "path escapes the destination")
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isdev()):  # devices: the data filter refuses them
        raise _unsafe(m.name, archive_name, f"unsupported member type {m.type!r}")
    if not name:
        if m.isdir():
            return None  # "./": the destination itself
        raise _unsafe(m.name, archive_name, "member has no name")
    if name in seen and (seen[name], kind) != ("dir", "dir"):
        raise _unsafe(m.name, archive_name, "duplicate member (a later copy would overwrite an earlier one)")
    seen[name] = kind
    if not m.islnk():
        return m.replace(name=name, deep=False)
    link = "/".join(p for p in m.linkname.split("/") if p not in ("", "."))
    if os.path.isabs(m.linkname):
        raise _unsafe(m.name, archive_name, f"hardlink to an absolute path {m.linkname!r}")
    if ".." in link.split("/"):
        raise _unsafe(m.name, archive_name, f"hardlink target {m.linkname!r} escapes the destination")
    if seen.get(link) != "file":
        raise _unsafe(m.name, archive_name, f"hardlink target {m.linkname!r} is not an earlier regular file")
    return m.replace(name=name, linkname=link, deep=False)


def _over(caps: list[tuple[int, str]], total: int) -> str | None:
    return next((rule for cap, rule in caps if total > cap), None)


def extract_members(archive: Path, name: str, root: Path, caps: list[tuple[int, str]], max_members: int,
                     progress_every: float) -> tuple[int, int]:
    """Extract ``archive`` into the empty folder ``root``; returns (members, extracted bytes)."""
    members = extracted = 0
    current, where, seen = "(archive header)", "at the first member", {}
    progress = Progress(f"extracting {name}", archive.stat().st_size, unit="bytes", every=progress_every)
    with open(archive, "rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        compression = next((c for magic, c in _MAGIC if head.startswith(magic)), "")
        try:
            with tarfile.open(fileobj=raw, mode=f"r:{compression}", errorlevel=2) as tf:
                while (m := tf.next()) is not None:
                    current, where, members = m.name, f"after member {m.name!r}", members + 1
                    if members > max_members:
                        raise _unsafe(m.name, name, f"more than max_members={max_members} members (decompression "
                                      "bomb cap)")
                    if (m := _check_member(m, name, seen)) is None:
                        continue
                    extracted += m.size if m.isreg() else 0
                    if m.isreg() and (rule := _over(caps, extracted)):
                        raise _unsafe(m.name, name, f"extracted size would exceed {rule}")
                    tf.extract(m, root, set_attrs=True, filter="data")
                    progress.update(raw.tell() - progress.done)
                # read to the end of the compressed stream: a truncated trailer or data after the archive is
                # an error, and what is read counts toward the caps
                where, trailing = "at the end of the archive", 0
                while block := tf.fileobj.read(CHUNK):  # type: ignore[union-attr]
                    trailing += len(block)
                    if rule := _over(caps, extracted + trailing):
                        raise _unsafe("(end of archive)", name, f"data after the end of the archive exceeds {rule}")
        except tarfile.FilterError as exc:
            rule = _FILTER_RULES.get(type(exc), "{text}")
            raise _unsafe(current, name, rule.format(kind="symlink" if exc.tarinfo.issym() else "hardlink",
                                                     link=exc.tarinfo.linkname, text=one_line(exc))) from exc
        except _CORRUPT as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # disk full, permissions
                raise PersoncarError(f"cannot extract member {current!r} of {name} ({extracted} bytes so far): "
                                     f"{exc.strerror}") from exc
            if not members and not compression:
                raise PersoncarError(f"{name} is not a readable .tar.gz/.tgz/.tar archive: {one_line(exc)}") from exc
            raise PersoncarError(f"corrupt or truncated archive {name} {where}: {one_line(exc)}") from exc
        progress.update(raw.tell() - progress.done)
    progress.finish()
    return members, extracted
