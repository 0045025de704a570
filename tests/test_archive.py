"""The archive format: standard tools read it, and every kind of damage is refused."""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
import zstandard

from kerrickpt import archive, archiveindex, archivewriter, members, zstdframe
from kerrickpt.errors import ArchiveCorruptError, ArchiveUnreadableError, UsageError
from kerrickpt.manifest import VERSION, Manifest
from kerrickpt.node import Fingerprint

SOURCE = Fingerprint("x86_64", "6.1.0", "debian 12", "4.2.1", ("fpu", "sse2"), 4096, "v2")


def manifest() -> Manifest:
    return Manifest(name="demo", created="2026-01-01T00:00:00+00:00", source=SOURCE, processes=[], command=["sh"])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "in").mkdir()
    made = {}
    contents = {"images/pages-1.img": b"\x00" * 100_000 + b"tail", "images/core-1.img": b"core", "log": b"l\n"}
    for name, data in contents.items():
        path = tmp_path / "in" / name.replace("/", "_")
        path.write_bytes(data)
        made[name] = path
    return made


def test_round_trip_and_standard_tools(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.kckpt"
    written = archivewriter.write(out, manifest(), files)
    assert out.stat().st_mode & 0o777 == 0o600
    listing = subprocess.run(f"zstd -dc {out} | tar -t", shell=True, capture_output=True, text=True, check=True)
    assert listing.stdout.split() == ["format", "images/core-1.img", "images/pages-1.img", "log", "manifest.json"]
    dest = tmp_path / "out"
    dest.mkdir()
    read = archive.extract(out, dest)
    assert read.members == written.members
    assert (dest / "images" / "pages-1.img").read_bytes() == files["images/pages-1.img"].read_bytes()
    assert (dest / "images" / "pages-1.img").stat().st_mode & 0o777 == 0o600
    assert archive.read_manifest(out).name == "demo"
    assert read.memory_bytes == 100_004
    assert "compress_s" in read.timings


def test_write_never_replaces_a_file(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.kckpt"
    out.write_text("keep")
    with pytest.raises(UsageError):
        archivewriter.write(out, manifest(), files)
    assert out.read_text() == "keep"


def test_failed_write_leaves_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    files["images/gone.img"] = tmp_path / "missing"
    out = tmp_path / "a.kckpt"
    with pytest.raises(FileNotFoundError):
        archivewriter.write(out, manifest(), files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_sizes_cap_a_member(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), files, sizes={"log": 1})
    dest = tmp_path / "out"
    dest.mkdir()
    archive.extract(out, dest)
    assert (dest / "log").read_bytes() == b"l"


def _extract_error(path: Path, tmp_path: Path) -> str:
    dest = tmp_path / "dest"
    dest.mkdir(exist_ok=True)
    with pytest.raises(ArchiveCorruptError) as caught:
        archive.extract(path, dest)
    return str(caught.value)


@pytest.mark.parametrize("offset", [0.1, 0.5, 0.9])
def test_flipped_byte_is_refused(files: dict[str, Path], tmp_path: Path, offset: float) -> None:
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), files)
    data = bytearray(out.read_bytes())
    data[int(len(data) * offset)] ^= 0x10
    out.write_bytes(bytes(data))
    _extract_error(out, tmp_path)


def test_truncated_archive_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), files)
    out.write_bytes(out.read_bytes()[:-1])
    assert "truncated" in _extract_error(out, tmp_path)


def _rebuild(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A hand-made archive, as someone tampering with one would build it."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))


def _members(path: Path) -> list[tuple[str, bytes]]:
    raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda ms: [(n, d + b"x" if n == "log" else d) for n, d in ms], "checksum"),
        (lambda ms: [m for m in ms if m[0] != "images/core-1.img"], "lacks images/core-1.img"),
        (lambda ms: [ms[0], ("images/extra.img", b"x"), *ms[1:]], "does not list"),
        (lambda ms: [m for m in ms if m[0] != "manifest.json"], "no manifest"),
        (lambda ms: [("../escape", b"x"), *ms], "unexpected member"),
        (lambda ms: [("images/../../escape", b"x"), *ms], "unexpected member"),
        (lambda ms: [("images/..000000", b"x"), *ms], "unexpected member"),
        (lambda ms: [("images/.000000", b"x"), *ms], "unexpected member"),
        (lambda ms: [*ms, ("log", b"again")], "after its manifest"),
    ],
)
def test_tampered_members_are_refused(files: dict[str, Path], tmp_path: Path, tamper, message: str) -> None:
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), files)
    _rebuild(out, tamper(_members(out)))
    assert message in _extract_error(out, tmp_path)
    assert not (tmp_path / "escape").exists()


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ArchiveCorruptError, match="cannot read"):
        archive.read_manifest(tmp_path / "nothing.kckpt")


def test_other_format_version_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), files)
    current = f'"version": {VERSION}'.encode()
    _rebuild(out, [(n, d.replace(current, b'"version": 99')) for n, d in _members(out)])
    with pytest.raises(ArchiveCorruptError, match="version 99"):
        archive.read_manifest(out)


BIG = random.Random(6).randbytes(archivewriter.CHUNK_BYTES * 2) + b"rest"  # no two chunks alike


@pytest.fixture
def streamed(tmp_path: Path) -> Path:
    """An archive written as CRIU's stream writes it: two files at once, one of them in three chunks."""
    out = tmp_path / "s.kckpt"
    with archivewriter.Writer(out) as writer:
        images = writer.under("images/")
        for start in range(0, len(BIG), 1 << 20):
            images.write("pages-1.img", BIG[start : start + (1 << 20)])
            images.write("pagemap-1.img", b"map")
        images.end("pagemap-1.img")
        images.end("pages-1.img")
        images.end("empty.img")
        writer.commit(manifest())
    return out


def test_streams_are_cut_into_chunks_and_reassembled(streamed: Path, tmp_path: Path) -> None:
    listing = subprocess.run(f"zstd -dc {streamed} | tar -t", shell=True, capture_output=True, text=True, check=True)
    assert listing.stdout.split() == [
        "format",
        "images/pages-1.img.000000",
        "images/pages-1.img.000001",
        "images/pagemap-1.img",
        "images/pages-1.img.000002",
        "images/empty.img",
        "manifest.json",
    ]
    dest = tmp_path / "out"
    dest.mkdir()
    read = archive.extract(streamed, dest)
    assert (dest / "images" / "pages-1.img").read_bytes() == BIG
    assert (dest / "images" / "pagemap-1.img").read_bytes() == b"map" * 9
    assert (dest / "images" / "empty.img").read_bytes() == b""
    assert (dest / "images" / "pages-1.img").stat().st_mode & 0o777 == 0o600
    pages = next(m for m in read.members if m.name == "images/pages-1.img")
    assert (pages.size, pages.chunks, pages.chunk_bytes) == (len(BIG), 3, archivewriter.CHUNK_BYTES)
    assert read.memory_bytes == len(BIG)


def test_a_file_of_exactly_one_chunk_is_one_member(tmp_path: Path) -> None:
    source = tmp_path / "one"
    source.write_bytes(b"x" * archivewriter.CHUNK_BYTES)
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), {"images/pages-1.img": source})
    assert [name for name, _ in _members(out)] == ["format", "images/pages-1.img", "manifest.json"]


def test_version_1_archives_still_read(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), files)
    current = f'"version": {VERSION}'.encode()
    _rebuild(out, [(n, d.replace(current, b'"version": 1')) for n, d in _members(out)])
    assert archive.verify(out).name == "demo"


def _as_version_2(ms: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The same archive as kerrickpt wrote it before version 3: no header, sha256 digests named so."""
    body = json.loads(dict(ms)["manifest.json"])
    contents = dict(ms)
    for member in body["members"]:
        member["sha256"] = hashlib.sha256(contents[member["name"]]).hexdigest()
        del member["digest"]
    body.update(version=2)
    del body["checksum"]
    return [(n, json.dumps(body).encode() if n == "manifest.json" else d) for n, d in ms if n != members.HEADER]


def test_version_2_archives_with_sha256_still_read_and_are_checked(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), files)
    old = _as_version_2(_members(out))
    _rebuild(out, old)
    (tmp_path / "x").mkdir()
    assert archive.extract(out, tmp_path / "x").checksum == "sha256"
    assert (tmp_path / "x" / "log").read_bytes() == b"l\n"
    _rebuild(out, [(n, d + b"x" if n == "log" else d) for n, d in old])
    assert "checksum" in _extract_error(out, tmp_path)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        # Without its header a version 3 archive would be checked with sha256: the manifest says otherwise.
        (lambda ms: ms[1:], "its manifest says xxh3_128"),
        (lambda ms: [ms[1], ms[0], *ms[2:]], "header in the middle"),
        (lambda ms: [(n, b"{}" if n == members.HEADER else d) for n, d in ms], "damaged format header"),
    ],
)
def test_a_missing_misplaced_or_damaged_header_is_refused(
    files: dict[str, Path], tmp_path: Path, tamper, message: str
) -> None:
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), files)
    assert _members(out)[0][0] == members.HEADER
    _rebuild(out, tamper(_members(out)))
    assert message in _extract_error(out, tmp_path)


def _swap(ms: list[tuple[str, bytes]], a: str, b: str) -> list[tuple[str, bytes]]:
    by_name = dict(ms)
    return [(n, by_name[b] if n == a else by_name[a] if n == b else d) for n, d in ms]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda ms: [m for m in ms if m[0] != "images/pages-1.img.000001"], "out of order"),
        (lambda ms: [m for m in ms if m[0] != "images/pages-1.img.000002"], "lacks chunk 2 of images/pages-1.img"),
        (lambda ms: _swap(ms, "images/pages-1.img.000000", "images/pages-1.img.000001"), "checksum"),
        (lambda ms: [(n.replace(".000001", ".000000"), d) for n, d in ms], "out of order"),
        (lambda ms: [(n.replace("pagemap-1.img", "pages-1.img.000002"), d) for n, d in ms], "out of order"),
        (lambda ms: [(n.replace("pages-1.img.000002", "pagemap-1.img.000000"), d) for n, d in ms], "twice"),
        (lambda ms: [ms[0], ("images/pagemap-1.img.000000", b"map"), *ms[1:]], "twice"),
        (lambda ms: [(n, d[:-1] if n.endswith(".000002") else d) for n, d in ms], "checksum"),
    ],
    ids=[
        "missing",
        "missing-last",
        "swapped",
        "repeated",
        "other-file",
        "other-file-twice",
        "whole-and-chunked",
        "short",
    ],
)
def test_damaged_chunks_are_refused(streamed: Path, tmp_path: Path, tamper, message: str) -> None:
    _rebuild(streamed, tamper(_members(streamed)))
    assert message in _extract_error(streamed, tmp_path)


def test_chunk_like_and_repeated_names_are_never_written(tmp_path: Path) -> None:
    with archivewriter.Writer(tmp_path / "a.kckpt") as writer:
        with pytest.raises(ValueError, match="unsafe"):
            writer.write("images/pages-1.img.000000", b"x")
        writer.end("images/core-1.img")
        with pytest.raises(ValueError, match="already"):
            writer.write("images/core-1.img", b"x")
    assert list(tmp_path.iterdir()) == []


def test_an_io_error_is_unreadable_not_corrupt(tmp_path: Path) -> None:
    # A store must not take an I/O error for a corrupt archive, and prune it.
    with pytest.raises(ArchiveUnreadableError) as caught:
        archive.verify(tmp_path)  # a directory: open() fails as a failing disk would
    assert caught.value.exit_code == 6


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_a_frame_cut_anywhere_is_truncated(files: dict[str, Path], tmp_path: Path, keep: float) -> None:
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), files)
    data = out.read_bytes()
    out.write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in _extract_error(out, tmp_path)


def test_a_block_claiming_too_much_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), files)
    data = bytearray(out.read_bytes())
    start = zstandard.frame_header_size(bytes(data))
    data[start : start + 3] = ((1 << 20) << 3).to_bytes(3, "little")  # a raw block of 1 MiB: over zstd's limit
    out.write_bytes(bytes(data))
    assert "claims" in _extract_error(out, tmp_path)


def test_zeroed_memory_after_random_memory_decompresses_in_bounded_steps() -> None:
    # Fed by ratio, the random MiB would set the pace and the zeros would come out in one piece.
    packer = zstandard.ZstdCompressor(write_checksum=True).compressobj()
    frame = packer.compress(random.Random(1).randbytes(1 << 20))
    frame += b"".join(packer.compress(bytes(1 << 24)) for _ in range(16)) + packer.flush()
    steps = [len(step) for step in zstdframe.blocks(io.BytesIO(frame), "zeros")]
    assert sum(steps) == (1 << 20) + (1 << 28)
    assert max(steps) <= zstdframe.BLOCKS_PER_STEP * zstandard.BLOCKSIZE_MAX


def test_a_long_name_goes_through_a_pax_header(tmp_path: Path) -> None:
    name = "images/" + "x" * 120 + ".img"
    out = tmp_path / "a.kckpt"
    with archivewriter.Writer(out) as writer:
        writer.write(name, b"long")
        writer.end(name)
        writer.commit(manifest())
    assert b" path=" + name.encode() in zstandard.ZstdDecompressor().stream_reader(out.open("rb")).read()
    dest = tmp_path / "out"
    dest.mkdir()
    archive.extract(out, dest)
    assert (dest / name).read_bytes() == b"long"


class _FailingStream(io.RawIOBase):
    """An archive arriving as a stream whose source fails part of the way."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        self.data = io.BytesIO(data)
        self.fail_at = fail_at

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.data.tell() >= self.fail_at:
            raise OSError(5, "Input/output error")
        return self.data.readinto(target)


def test_a_read_error_in_the_worker_is_unreadable_and_leaves_no_thread(streamed: Path, tmp_path: Path) -> None:
    before = threading.enumerate()
    data = streamed.read_bytes()
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArchiveUnreadableError, match="Input/output error"):
        archive.extract(io.BufferedReader(_FailingStream(data, len(data) // 2)), dest)
    assert threading.enumerate() == before


def test_a_write_error_stops_the_worker(streamed: Path, tmp_path: Path) -> None:
    before = threading.enumerate()
    dest = tmp_path / "out"
    (dest / "images").mkdir(parents=True)
    (dest / "images" / "pages-1.img").write_bytes(b"in the way")
    with pytest.raises(FileExistsError):  # an OSError of this node's disk, not a damaged archive
        archive.extract(streamed, dest)
    assert threading.enumerate() == before


def test_a_log_bigger_than_a_chunk_comes_back(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(random.Random(7).randbytes(archivewriter.CHUNK_BYTES + 1000))
    out = tmp_path / "a.kckpt"
    archivewriter.write(out, manifest(), {"log": log})
    assert "log.000001" in [n for n, _ in _members(out)]
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.extract(out, dest)
    assert (dest / "log").read_bytes() == log.read_bytes()


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE, raw_size: bytes | None = None) -> bytes:
    """One tar header, its size field as given (a crafted archive), with a valid header checksum."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    if raw_size is not None:
        block[124:136] = raw_size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_header("log", 0, raw_size=b"\xff" * 12), "-1 bytes"),  # base-256: a negative size
        (_header("manifest.json", 1 << 32), "claims"),
        (_header("log", 0, tarfile.CONTTYPE), "unexpected member"),
        (_header("log", 0, tarfile.SYMTYPE), "unexpected member"),
        (_header("x", 1 << 32, tarfile.XHDTYPE), "pax header of"),
    ],
)
def test_crafted_tar_headers_are_refused_at_once(tmp_path: Path, member: bytes, message: str) -> None:
    out = tmp_path / "crafted.kckpt"
    out.write_bytes(zstandard.ZstdCompressor().compress(member + bytes(1 << 16)))
    assert message in _extract_error(out, tmp_path)


def test_a_pax_length_of_thousands_of_digits_is_corrupt(tmp_path: Path) -> None:
    record = b"9" * 5000 + b" path=x\n"
    out = tmp_path / "crafted.kckpt"
    out.write_bytes(zstandard.ZstdCompressor().compress(_header("p", len(record), tarfile.XHDTYPE) + record))
    assert "damaged pax header" in _extract_error(out, tmp_path)


def test_a_file_that_is_not_zstd_is_refused_as_such(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "plain.tar"
    out.write_bytes(_header("log", 0) + bytes(1024))
    assert "not zstd-compressed" in _extract_error(out, tmp_path)


def test_the_index_at_the_end_holds_the_manifest_and_the_small_images_but_no_memory(streamed: Path) -> None:
    index = archive.read_index(streamed)
    assert index is not None
    assert index.manifest == archive.verify(streamed) == archive.read_manifest(streamed)
    assert index.files == {"images/pagemap-1.img": b"map" * 9, "images/empty.img": b""}
    assert streamed.read_bytes().endswith(archiveindex.DIGESTED_TAG)


def _index_start(path: Path) -> int:
    data = path.read_bytes()
    return len(data) - int.from_bytes(data[-16:-8], "little")


@pytest.mark.parametrize("where", ["body", "footer"])
def test_a_damaged_index_is_refused(streamed: Path, tmp_path: Path, where: str) -> None:
    data = bytearray(streamed.read_bytes())
    data[(_index_start(streamed) + len(data) - 16) // 2 if where == "body" else -1] ^= 0x20
    streamed.write_bytes(bytes(data))
    assert "index" in _extract_error(streamed, tmp_path)
    if where == "body":
        with pytest.raises(ArchiveCorruptError, match="index"):
            archive.read_index(streamed)
    else:  # no index can be found: a restore unpacks the archive, and that refuses it
        assert archive.read_index(streamed) is None


def test_an_index_that_does_not_match_the_manifest_is_refused(streamed: Path, tmp_path: Path) -> None:
    index = archive.read_index(streamed)
    assert index is not None and index.frame is not None
    other = index.body.replace(b'"demo"', b'"omed"')
    data = streamed.read_bytes()[: _index_start(streamed)]
    streamed.write_bytes(data + archiveindex.pack(other, index.files, index.frame))
    assert "does not match its manifest" in _extract_error(streamed, tmp_path)
    streamed.write_bytes(data + archiveindex.pack(index.body, {"images/pagemap-1.img": b"pam" * 9}, index.frame))
    with pytest.raises(ArchiveCorruptError, match=r"copy of images/pagemap-1\.img"):
        archive.read_index(streamed)


def test_a_version_7_archive_whose_index_lacks_the_digests_is_refused(streamed: Path, tmp_path: Path) -> None:
    data = streamed.read_bytes()
    start = _index_start(streamed)
    body = data[start + 8 : -48]  # the index's compressed tar, without its foot of digests, length and tag
    old = struct.pack("<II", archiveindex.INDEX_MAGIC, len(body) + 16) + body
    old += struct.pack("<Q8s", len(old) + 16, archiveindex.INDEX_TAG)  # the foot of versions 4 to 6
    streamed.write_bytes(data[:start] + old)
    index = archive.read_index(streamed)
    assert index is not None and index.frame is None, "an index as versions 4 to 6 end with still reads"
    assert "lacks the digests" in _extract_error(streamed, tmp_path)


@pytest.mark.parametrize(("cut", "message"), [("all", "lacks the index"), ("part", "its index ends early")])
def test_an_archive_cut_in_or_before_its_index_is_truncated(
    streamed: Path, tmp_path: Path, cut: str, message: str
) -> None:
    start = _index_start(streamed)
    streamed.write_bytes(streamed.read_bytes()[: start if cut == "all" else start + 20])
    assert archive.read_index(streamed) is None
    assert message in _extract_error(streamed, tmp_path)


def test_over_its_budget_the_index_keeps_the_smallest_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Room for two images, framing counted.
    monkeypatch.setattr(archiveindex, "INDEX_BYTES", 2 * archiveindex.INDEX_FRAMING + 60)
    out = tmp_path / "a.kckpt"
    with archivewriter.Writer(out) as writer:
        for name, size in (("core-1.img", 60), ("mm-1.img", 50), ("inventory.img", 10)):  # the dump's order
            writer.write(f"images/{name}", b"x" * size)
            writer.end(f"images/{name}")
        writer.commit(manifest())
    index = archive.read_index(out)
    assert index is not None and sorted(index.files) == ["images/inventory.img", "images/mm-1.img"]


def test_a_mirror_that_fails_and_keeps_its_failure_does_not_stop_the_archive(tmp_path: Path) -> None:
    # A migration's live stream keeps the error of a link that broke, and with it the frames that
    # handed it the archive's bytes: the archive must still be written whole, for the retries.
    kept: list[BaseException] = []

    def mirror(data: bytes | memoryview) -> None:
        if not kept:
            try:
                raise BrokenPipeError("the link broke")
            except BrokenPipeError as exc:
                kept.append(exc)

    out = tmp_path / "s.kckpt"
    with archivewriter.Writer(out, mirror=mirror) as writer:
        for start in range(0, len(BIG), 1 << 20):
            writer.write("images/pages-1.img", BIG[start : start + (1 << 20)])
        writer.end("images/pages-1.img")
        writer.commit(manifest())

    assert kept, "the mirror failed"
    dest = tmp_path / "out"
    dest.mkdir()
    archive.extract(out, dest)
    assert (dest / "images" / "pages-1.img").read_bytes() == BIG


def _small_checkpoint(path: Path) -> bytes:
    """A ~25 KB archive of what a small checkpoint holds: memory of random, zeroed and text pages, small images."""
    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randint(2, 8))) for _ in range(200)]
    text = b" ".join(rng.choices(words, k=4000))
    with archivewriter.Writer(path) as writer:
        for name, data in (
            ("pages-1.img", rng.randbytes(12000) + bytes(40000) + text),
            ("core-1.img", text[:5000]),
            ("inventory.img", b"inv" * 30),
        ):
            writer.write(f"images/{name}", data)
            writer.end(f"images/{name}")
        writer.commit(manifest())
    return path.read_bytes()


def _zstd_holds(data: bytes, start: int) -> bytes | None:
    """What the zstd frame at data[start:] decompresses to, its checksum checked; None if zstd refuses it."""
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(data[start:])
    except zstandard.ZstdError:
        return None


def test_a_bit_flipped_anywhere_is_refused_even_where_zstd_decodes_the_same(tmp_path: Path) -> None:
    out = tmp_path / "a.kckpt"
    data = _small_checkpoint(out)
    index_at = _index_start(out)

    def flipped(at: int) -> bytes:
        damaged = bytearray(data)
        damaged[at] ^= 1 << at % 8
        return bytes(damaged)

    # zstd ignores some bits of its encoding (the frame header's unused bit, a window size bigger than
    # needed, some bits of its entropy tables): such a flip changes no byte a frame holds, nor a checksum.
    frame = _zstd_holds(data, 0)
    unseen = [at for at in range(index_at) if _zstd_holds(flipped(at), 0) == frame]
    index = _zstd_holds(data, index_at + 8)  # the index's frame, after its skippable frame's head
    foot = len(data) - 48  # two digests, the index's length and its tag (see archiveindex)
    unseen_in_index = [at for at in range(index_at + 8, foot) if _zstd_holds(flipped(at), index_at + 8) == index]
    assert len(unseen) >= 5 and 5 in unseen, "the frame has flips only the digest of its bytes catches"
    assert unseen_in_index, "so has the index"
    for at in range(len(data)):
        with pytest.raises(ArchiveCorruptError):
            archive.extract(io.BytesIO(flipped(at)), None)
            pytest.fail(f"a flipped bit at offset {at} of {len(data)} was accepted")
    for at in [*unseen, *range(index_at, len(data))]:  # unseen_in_index among them
        out.write_bytes(flipped(at))
        with pytest.raises(ArchiveCorruptError):
            archive.verify(out)
        if at >= index_at:  # inspect reads the index alone
            with pytest.raises(ArchiveCorruptError):
                archive.read_manifest(out)
