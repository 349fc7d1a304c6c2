"""Safe extraction of the dataset archive (local sources).

Hostile archives are built by hand in tmp_path. Each must be refused with the member and the
rule named, write nothing outside the destination, and leave ``dest`` exactly as it was (absent,
or with its previous content). A good archive extracts, and a re-run is idempotent.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tasks import download as dl
from tasks.download import MANIFEST_NAME, download_dataset
from tasks.errors import PersoncarError
from tests.conftest import coco_doc, snapshot

MTIME = 1_700_000_000
N_IMAGES = 3


# ----------------------------------------------------------------------------- archive builders

def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), ((60 * i) % 256, 120, 200)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _coco(n: int) -> bytes:
    licenses = [{"url": "https://creativecommons.org/licenses/by/2.0/", "id": 1, "name": "Attribution License"}]
    return json.dumps(coco_doc(n, (32, 24), [2, 3, 10, 12], licenses=licenses)).encode()


def _info(name: str, type_: bytes, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mtime = MTIME
    ti.mode = 0o755 if type_ == tarfile.DIRTYPE else 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def f_(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, tarfile.REGTYPE, size=len(data)), data


def d_(name: str) -> tuple[tarfile.TarInfo, None]:
    return _info(name, tarfile.DIRTYPE), None


def sym_(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return _info(name, tarfile.SYMTYPE, linkname=target), None


def hard_(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return _info(name, tarfile.LNKTYPE, linkname=target), None


def dev_(name: str, type_: bytes) -> tuple[tarfile.TarInfo, None]:
    return _info(name, type_, devmajor=1, devminor=3), None


def images_part(n: int = N_IMAGES) -> list:
    return [d_("trainval"), d_("trainval/images")] + [
        f_(f"trainval/images/image_{i + 1:09d}.jpg", _jpeg(i)) for i in range(n)]


def annotations_part(n: int = N_IMAGES) -> list:
    return [d_("trainval/annotations"), f_("trainval/annotations/bbox-annotations.json", _coco(n))]


def good_entries(n: int = N_IMAGES) -> list:
    return images_part(n) + annotations_part(n)


def write_tar(path: Path, entries: list, mode: str = "w:gz") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path





@pytest.fixture()
def ws(tmp_path: Path):
    """A workspace: dest's parent folder, a cache, and an 'outside' folder escapes would reach."""
    class W:
        work = tmp_path / "work"
        dest = tmp_path / "work" / "dest"
        cache = tmp_path / "cache"
        outside = tmp_path / "outside"
        archives = tmp_path / "archives"
    W.work.mkdir()
    W.outside.mkdir()
    (W.outside / "secret.txt").write_text("secret")
    return W


def run(ws, archive: Path, **kw):
    return download_dataset(str(archive), ws.dest, cache_dir=ws.cache, progress_every=3600, **kw)


# ----------------------------------------------------------------------------- hostile archives

def hostile_cases(outside: Path) -> dict[str, tuple[list, str, str]]:
    """name -> (entries, member named in the error, rule named in the error)."""
    good = good_entries()
    head, tail = good[:3], good[3:]  # hostile member after some good files were already written
    secret = str(outside / "secret.txt")
    return {
        "traversal": (head + [f_("../evil", b"pwned")] + tail, "'../evil'", "path escapes the destination"),
        "nested traversal": (head + [f_("trainval/images/../../../../outside/evil", b"pwned")] + tail,
                             "'trainval/images/../../../../outside/evil'", "path escapes the destination"),
        "absolute path": (head + [f_(str(outside / "abs.txt"), b"pwned")] + tail,
                          repr(str(outside / "abs.txt")), "absolute path"),
        "symlink escape": (head + [sym_("trainval/images/up", "../../../outside"),
                                   f_("trainval/images/up/evil", b"pwned")] + tail,
                           "'trainval/images/up'", "symlink target '../../../outside' escapes the destination"),
        "symlink absolute": (head + [sym_("trainval/images/abs", str(outside)),
                                     f_("trainval/images/abs/evil", b"pwned")] + tail,
                             "'trainval/images/abs'", "symlink to an absolute path"),
        # lexically 'a/b -> ..' stays inside, but 'a' is itself a link to the root: b would escape
        "symlink chain": (head + [sym_("a", "."), sym_("a/b", ".."), f_("a/b/outside/evil", b"pwned")] + tail,
                          "'a/b'", "symlink target '..' escapes the destination"),
        "hardlink escape": (head + [hard_("trainval/images/h", "../../../outside/secret.txt")] + tail,
                            "'trainval/images/h'", "hardlink target '../../../outside/secret.txt' escapes"),
        "hardlink absolute": (head + [hard_("trainval/images/h", secret)] + tail,
                              "'trainval/images/h'", "hardlink to an absolute path"),
        "char device": (head + [dev_("trainval/images/null", tarfile.CHRTYPE)] + tail,
                        "'trainval/images/null'", "device or fifo file"),
        "block device": (head + [dev_("trainval/images/sda", tarfile.BLKTYPE)] + tail,
                         "'trainval/images/sda'", "device or fifo file"),
        "fifo": (head + [dev_("trainval/images/pipe", tarfile.FIFOTYPE)] + tail,
                 "'trainval/images/pipe'", "device or fifo file"),
        "duplicate file": (good + [f_("trainval/annotations/bbox-annotations.json", b"{}")],
                           "'trainval/annotations/bbox-annotations.json'", "duplicate member"),
    }


CASE_NAMES = list(hostile_cases(Path("/x")).keys())


@pytest.fixture(params=["dest absent", "dest exists"])
def prior(request, ws):
    """Run each failure both into a fresh dest and over an earlier good extraction."""
    if request.param == "dest exists":
        (ws.dest / "trainval").mkdir(parents=True)
        (ws.dest / "trainval" / "previous.txt").write_text("earlier run")
        (ws.dest / MANIFEST_NAME).write_text('{"earlier": true}')
    return snapshot(ws.dest)


def assert_untouched(ws, before: dict) -> None:
    assert snapshot(ws.dest) == before
    leftovers = [p.name for p in ws.work.iterdir() if p.name != "dest"]
    assert leftovers == [], f"temp folders left beside dest: {leftovers}"
    assert sorted(p.name for p in ws.outside.iterdir()) == ["secret.txt"]
    assert (ws.outside / "secret.txt").read_text() == "secret"
    assert os.stat(ws.outside / "secret.txt").st_nlink == 1
    assert not (ws.work / "evil").exists() and not (ws.work.parent / "evil").exists()


@pytest.mark.parametrize("case", CASE_NAMES)
def test_hostile_member_is_refused_by_rule(ws, prior, case):
    entries, member, rule = hostile_cases(ws.outside)[case]
    archive = write_tar(ws.archives / "trainval.tar.gz", entries)
    with pytest.raises(PersoncarError) as ei:
        run(ws, archive)
    msg = str(ei.value)
    assert msg.startswith(f"unsafe archive member {member} in trainval.tar.gz: "), msg
    assert rule in msg
    assert "\n" not in msg
    assert_untouched(ws, prior)


def test_traversal_message_is_exactly_the_documented_one(ws):
    archive = write_tar(ws.archives / "trainval.tar.gz", good_entries() + [f_("../evil", b"x")])
    with pytest.raises(PersoncarError, match=r"^unsafe archive member '\.\./evil' in trainval\.tar\.gz: "
                                             r"path escapes the destination$"):
        run(ws, archive)


def test_decompression_bomb_size_cap(ws, prior):
    bomb = b"\0" * (4 << 20)  # 4 MiB of zeros: a few KiB compressed
    archive = write_tar(ws.archives / "trainval.tar.gz", good_entries() + [f_("trainval/images/bomb.bin", bomb)])
    assert archive.stat().st_size < 64 * 1024
    with pytest.raises(PersoncarError) as ei:
        run(ws, archive, max_total_bytes=1 << 20)
    assert "'trainval/images/bomb.bin'" in str(ei.value)
    assert "max_total_bytes=1048576" in str(ei.value) and "decompression bomb" in str(ei.value)
    assert_untouched(ws, prior)


def test_decompression_bomb_hidden_after_the_end_of_the_archive(ws, prior):
    archive = write_tar(ws.archives / "trainval.tar.gz", good_entries())
    with open(archive, "ab") as f:  # a second gzip member after the tar's end marker
        f.write(gzip.compress(b"\0" * (4 << 20)))
    with pytest.raises(PersoncarError, match=r"after the end of the archive exceeds max_total_bytes=1048576"):
        run(ws, archive, max_total_bytes=1 << 20)
    assert_untouched(ws, prior)


def test_member_count_cap(ws, prior):
    entries = good_entries() + [f_(f"trainval/images/extra_{i}.txt", b"x") for i in range(20)]
    archive = write_tar(ws.archives / "trainval.tar.gz", entries)
    with pytest.raises(PersoncarError, match=r"more than max_members=10 members \(decompression bomb cap\)"):
        run(ws, archive, max_members=10)
    assert_untouched(ws, prior)


@pytest.mark.parametrize("keep", [0.5, -4])  # cut inside the data / only the gzip trailer (CRC+size)
def test_truncated_gzip(ws, prior, keep):
    good = write_tar(ws.archives / "good.tar.gz", good_entries())
    data = good.read_bytes()
    cut = int(len(data) * keep) if keep > 0 else len(data) + keep
    archive = ws.archives / "trainval.tar.gz"
    archive.write_bytes(data[:cut])
    with pytest.raises(PersoncarError, match=r"corrupt or truncated archive trainval\.tar\.gz"):
        run(ws, archive)
    assert_untouched(ws, prior)


def test_corrupted_gzip_data(ws, prior):
    data = bytearray(write_tar(ws.archives / "good.tar.gz", good_entries()).read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    archive = ws.archives / "trainval.tar.gz"
    archive.write_bytes(bytes(data))
    with pytest.raises(PersoncarError, match=r"corrupt or truncated archive trainval\.tar\.gz"):
        run(ws, archive)
    assert_untouched(ws, prior)


@pytest.mark.parametrize("content", [b"", b"<html>Access denied</html>\n" * 20])
def test_not_an_archive(ws, prior, content):
    archive = ws.archives / "trainval.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(content)
    with pytest.raises(PersoncarError, match=r"trainval\.tar\.gz is not a readable \.tar\.gz/\.tgz/\.tar archive"):
        run(ws, archive)
    assert_untouched(ws, prior)


@pytest.mark.parametrize("entries_fn,missing", [
    (images_part, "trainval/annotations/bbox-annotations.json"),
    (lambda: [d_("trainval")] + annotations_part(), "trainval/images/"),
    (lambda: [f_("other/annotations.json", b"{}")],
     "trainval/annotations/bbox-annotations.json and trainval/images/"),
])
def test_missing_layout(ws, prior, entries_fn, missing):
    archive = write_tar(ws.archives / "trainval.tar.gz", entries_fn())
    with pytest.raises(PersoncarError) as ei:
        run(ws, archive)
    assert f"archive trainval.tar.gz ({archive}) lacks {missing};" in str(ei.value)
    assert_untouched(ws, prior)


def test_wrong_checksum_names_expected_actual_and_source(ws, prior):
    archive = write_tar(ws.archives / "trainval.tar.gz", good_entries())
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    wrong = "ab" * 32
    with pytest.raises(PersoncarError) as ei:
        run(ws, archive, sha256=wrong.upper())
    msg = str(ei.value)
    assert f"sha256 mismatch for {archive}: expected {wrong}, got {actual}" in msg
    assert archive.exists(), "a local source file is the user's: never delete it"
    assert_untouched(ws, prior)


# ----------------------------------------------------------------------------- good archives

def test_good_archive_extracts_and_rerun_is_idempotent(ws, caplog):
    entries = good_entries()
    archive = write_tar(ws.archives / "trainval.tar.gz", entries)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    caplog.set_level(logging.INFO, logger="personcar")

    first = run(ws, archive, sha256=digest)
    assert first["sha256"] == digest
    assert first["size_bytes"] == archive.stat().st_size
    assert first["archive_name"] == "trainval.tar.gz"
    assert first["source"] == str(archive)
    assert first["members"] == len(entries)
    assert first["images"] == N_IMAGES
    assert first["annotations_file"] == "trainval/annotations/bbox-annotations.json"
    assert first["extracted_bytes"] == sum(len(d) for _, d in entries if d is not None)
    assert first["reused_cache"] is False
    assert json.loads((ws.dest / MANIFEST_NAME).read_text()) == first
    for info, data in entries:  # every byte as packed
        if data is not None:
            assert (ws.dest / info.name).read_bytes() == data
    coco = json.loads((ws.dest / first["annotations_file"]).read_text())
    assert [im["file_name"] for im in coco["images"]] == sorted(
        p.name for p in (ws.dest / "trainval/images").iterdir())
    with Image.open(ws.dest / "trainval/images/image_000000001.jpg") as im:
        assert im.size == (32, 24)
    tree = snapshot(ws.dest)
    mtimes = {p: os.stat(ws.dest / p).st_mtime for p in tree if tree[p] != "dir"}

    caplog.clear()
    second = run(ws, archive, sha256=digest)
    assert second["reused_cache"] is True
    assert "not hashing again" in caplog.text
    strip = lambda m: {k: v for k, v in m.items() if k not in ("seconds", "reused_cache")}
    assert strip(second) == strip(first)
    now = snapshot(ws.dest)
    assert {k: v for k, v in now.items() if k != MANIFEST_NAME} == {k: v for k, v in tree.items() if k != MANIFEST_NAME}
    assert {p: os.stat(ws.dest / p).st_mtime for p in tree if tree[p] != "dir"}.keys() == mtimes.keys()
    assert all(os.stat(ws.dest / p).st_mtime == MTIME for p in mtimes if p != MANIFEST_NAME)
    assert [p.name for p in ws.work.iterdir()] == ["dest"]


def test_changed_local_archive_is_hashed_again(ws):
    archive = write_tar(ws.archives / "trainval.tar.gz", good_entries())
    first = run(ws, archive)
    st = archive.stat()
    write_tar(archive, good_entries(N_IMAGES + 1))
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime put back
    second = run(ws, archive)
    assert second["reused_cache"] is False
    assert second["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest() != first["sha256"]
    assert second["images"] == N_IMAGES + 1


def test_success_replaces_stale_dest_content(ws):
    (ws.dest / "trainval" / "images").mkdir(parents=True)
    (ws.dest / "trainval" / "images" / "stale.jpg").write_bytes(b"old")
    archive = write_tar(ws.archives / "trainval.tar.gz", good_entries())
    run(ws, archive)
    assert not (ws.dest / "trainval/images/stale.jpg").exists()
    assert len(list((ws.dest / "trainval/images").iterdir())) == N_IMAGES


@pytest.mark.parametrize("name,mode", [("trainval.tar", "w"), ("trainval.tgz", "w:gz"), ("data.tar.xz", "w:xz")])
def test_other_archive_formats(ws, name, mode):
    archive = write_tar(ws.archives / name, good_entries(), mode=mode)
    m = run(ws, archive)
    assert m["archive_name"] == name and m["images"] == N_IMAGES


def test_file_uri_with_space_and_tar_rooted_at_dot(ws):
    entries = [d_(".")] + [(info.replace(name="./" + info.name), data) for info, data in good_entries()]
    archive = write_tar(ws.archives / "my data" / "trainval.tar.gz", entries)
    uri = archive.as_uri()
    assert "%20" in uri
    m = download_dataset(uri, ws.dest, cache_dir=ws.cache)
    assert m["source"] == uri and m["images"] == N_IMAGES
    assert (ws.dest / "trainval/annotations/bbox-annotations.json").is_file()


def test_internal_symlinks_and_hardlinks_that_stay_inside_are_kept(ws):
    entries = good_entries() + [
        sym_("trainval/latest.jpg", "images/image_000000001.jpg"),
        hard_("trainval/images/copy.jpg", "trainval/images/image_000000002.jpg"),
    ]
    archive = write_tar(ws.archives / "trainval.tar.gz", entries)
    run(ws, archive)
    assert os.readlink(ws.dest / "trainval/latest.jpg") == "images/image_000000001.jpg"
    assert (ws.dest / "trainval/latest.jpg").read_bytes() == _jpeg(0)
    assert os.path.samefile(ws.dest / "trainval/images/copy.jpg", ws.dest / "trainval/images/image_000000002.jpg")


def test_progress_is_rate_limited_not_per_chunk(ws, caplog, monkeypatch):
    entries = good_entries() + [f_(f"trainval/images/pad_{i}.bin", os.urandom(4096)) for i in range(40)]
    archive = write_tar(ws.archives / "trainval.tar.gz", entries)
    monkeypatch.setattr(dl, "CHUNK", 4096)  # many chunks to hash
    caplog.set_level(logging.INFO, logger="personcar")
    download_dataset(str(archive), ws.dest, cache_dir=ws.cache, progress_every=3600)
    lines = [r.getMessage() for r in caplog.records if "MB/s" in r.getMessage()]
    assert len([x for x in lines if x.startswith("hashing")]) == 1  # the final line only
    assert len([x for x in lines if x.startswith("extracting")]) == 1
    assert f"of {archive.stat().st_size} bytes (100.0%)" in lines[-1]

    caplog.clear()  # a fresh cache, so the archive is hashed again, now with no rate limit
    download_dataset(str(archive), ws.work / "dest2", cache_dir=ws.cache / "other", progress_every=0)
    hashing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hashing")]
    assert len(hashing) > 10  # with no rate limit there is a line per chunk: the limit above is what holds it


# ----------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("source,pattern", [
    ("ftp://host/trainval.tar.gz", r"unsupported source scheme ftp://"),
    ("", r"source is empty"),
    ("s3://bucket-only", r"S3 source must be s3://bucket/key"),
    ("s3://bucket/prefix/", r"S3 source must be s3://bucket/key"),
    ("file://otherhost/x.tar.gz", r"file:// URI must name a local path"),
])
def test_bad_sources(ws, source, pattern):
    with pytest.raises(PersoncarError, match=pattern):
        download_dataset(source, ws.dest, cache_dir=ws.cache)
    assert not ws.dest.exists()


def test_missing_local_archive(ws):
    with pytest.raises(PersoncarError, match=r"archive not found: .*nope\.tar\.gz"):
        download_dataset(str(ws.archives / "nope.tar.gz"), ws.dest, cache_dir=ws.cache)


def test_bad_sha256_format(ws):
    archive = write_tar(ws.archives / "trainval.tar.gz", good_entries())
    with pytest.raises(PersoncarError, match=r"sha256 must be 64 hexadecimal characters"):
        run(ws, archive, sha256="abc")


def test_archive_or_cache_inside_dest_is_refused(ws):
    ws.dest.mkdir()
    inside = write_tar(ws.dest / "trainval.tar.gz", good_entries())
    with pytest.raises(PersoncarError, match=r"is inside dest .* replaced as a whole"):
        run(ws, inside)
    assert inside.exists()
    archive = write_tar(ws.archives / "trainval.tar.gz", good_entries())
    with pytest.raises(PersoncarError, match=r"cache folder .* is inside dest"):
        download_dataset(str(archive), ws.dest, cache_dir=ws.dest / "cache")


def test_dest_that_is_a_file_is_refused(ws):
    ws.dest.write_text("not a folder")
    archive = write_tar(ws.archives / "trainval.tar.gz", good_entries())
    with pytest.raises(PersoncarError, match=r"exists and is not a folder"):
        run(ws, archive)
    assert ws.dest.read_text() == "not a folder"
