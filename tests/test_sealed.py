"""Sealed archives: only their key opens them, and a byte changed, a segment moved, or a file cut short is refused."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import archive, archivewriter, keys, sealed
from kerrickpt.errors import ArchiveCorruptError, KeyUnusableError
from kerrickpt.manifest import Manifest
from tests.helpers import assert_consecutive, checkpointed_side_writer, cli, ticks, unique_name, wait_for
from tests.test_archive import manifest

SEGMENT = sealed.MIN_SEGMENT
HEADER = len(sealed.Header(keys.AES_GCM, "00" * keys.ID_BYTES, bytes(sealed.SALT_BYTES), SEGMENT).pack())
SEALED_SEGMENT = SEGMENT + sealed.OVERHEAD
MARKER = os.urandom(32)  # incompressible: it shows as it is in a plain archive


@pytest.fixture
def key(tmp_path: Path) -> keys.Key:
    return keys.create(tmp_path / "key")


def _seal(path: Path, plain: bytes, key: keys.Key, piece: int = 1000) -> None:
    with path.open("wb") as out:
        writer = sealed.Writer(out, key, SEGMENT)
        for at in range(0, len(plain), piece):  # by default in pieces that do not line up with the segments
            writer.write(plain[at : at + piece])
        writer.finish()


def _open(path: Path, key: keys.Key | None) -> bytes:
    with sealed.opened(path.open("rb"), key, str(path)) as fh:
        return fh.read()


@pytest.mark.parametrize("piece", [1000, SEGMENT, 4 * SEGMENT], ids=["small-writes", "segment-writes", "one-write"])
@pytest.mark.parametrize("size", [0, 1, SEGMENT, 3 * SEGMENT, 3 * SEGMENT + 7])
def test_a_sealed_file_reads_back_as_written_with_its_key(tmp_path: Path, key: keys.Key, size: int, piece: int) -> None:
    plain = os.urandom(size)
    path = tmp_path / "f"
    _seal(path, plain, key, piece)

    assert _open(path, key) == plain
    segments = max(1, -(-size // SEGMENT))
    assert path.stat().st_size == HEADER + size + segments * sealed.OVERHEAD


def test_a_sealed_file_is_read_from_anywhere(tmp_path: Path, key: keys.Key) -> None:
    plain = os.urandom(4 * SEGMENT + 100)
    path = tmp_path / "f"
    _seal(path, plain, key)
    with sealed.opened(path.open("rb"), key, "f") as fh:
        assert fh.seek(0, os.SEEK_END) == len(plain)
        for at, size in [(len(plain) - 50, 100), (SEGMENT - 3, 2 * SEGMENT), (0, 10), (5, -1)]:
            fh.seek(at)
            assert fh.read(size) == plain[at : at + size if size >= 0 else None]
            assert fh.tell() == min(len(plain), at + size if size >= 0 else len(plain))


def test_every_byte_changed_is_refused(tmp_path: Path, key: keys.Key) -> None:
    path = tmp_path / "f"
    _seal(path, os.urandom(2 * SEGMENT + 100), key)
    data = path.read_bytes()
    key_id = range(len(sealed.MAGIC) + 3, len(sealed.MAGIC) + 3 + keys.ID_BYTES)  # after the version and method
    for at in range(len(data)):
        changed = bytearray(data)
        changed[at] ^= 0x40
        path.write_bytes(changed)
        # A changed key id names another key: refused as not this key's, before anything is decrypted.
        with pytest.raises(KeyUnusableError if at in key_id else ArchiveCorruptError):
            _open(path, key)


def test_a_file_cut_short_or_grown_is_refused_even_at_a_segment_boundary(tmp_path: Path, key: keys.Key) -> None:
    path = tmp_path / "f"
    _seal(path, os.urandom(3 * SEGMENT + 100), key)
    data = path.read_bytes()
    for end in (HEADER, HEADER + SEALED_SEGMENT, HEADER + 3 * SEALED_SEGMENT):
        path.write_bytes(data[:end])
        with pytest.raises(ArchiveCorruptError, match="truncated"):
            _open(path, key)
    for end in (HEADER + 10, HEADER + SEALED_SEGMENT + 10, len(data) - 1):
        path.write_bytes(data[:end])
        with pytest.raises(ArchiveCorruptError):
            _open(path, key)
    path.write_bytes(data + data[HEADER : HEADER + SEALED_SEGMENT])
    with pytest.raises(ArchiveCorruptError):
        _open(path, key)


def test_segments_swapped_repeated_or_dropped_are_refused(tmp_path: Path, key: keys.Key) -> None:
    path = tmp_path / "f"
    _seal(path, os.urandom(3 * SEGMENT + 100), key)
    data = path.read_bytes()
    head, body = data[:HEADER], data[HEADER:]
    segments = [body[at : at + SEALED_SEGMENT] for at in range(0, len(body), SEALED_SEGMENT)]
    assert len(segments) == 4
    first, second, third, last = segments
    for order in (
        [second, first, third, last],
        [first, first, third, last],
        [first, third, last],
        [first, second, third],
    ):
        path.write_bytes(head + b"".join(order))
        with pytest.raises(ArchiveCorruptError):
            _open(path, key)
    other = tmp_path / "other"
    _seal(other, os.urandom(3 * SEGMENT + 100), key)  # the same key, another file: its segments are not this one's
    theirs = other.read_bytes()[HEADER + SEALED_SEGMENT : HEADER + 2 * SEALED_SEGMENT]
    path.write_bytes(head + first + theirs + third + last)
    with pytest.raises(ArchiveCorruptError):
        _open(path, key)


def test_a_sealed_file_needs_its_own_key_named_before_anything_is_decrypted(tmp_path: Path, key: keys.Key) -> None:
    path = tmp_path / "f"
    _seal(path, b"secret", key)
    with pytest.raises(KeyUnusableError, match=re.escape(f"encrypted ({keys.NAMES[key.sealing]}) with key {key.id}")):
        _open(path, None)
    other = keys.create(tmp_path / "other")
    with pytest.raises(KeyUnusableError, match=f"sealed with key {key.id}; the key given is {other.id}"):
        _open(path, other)


def test_a_header_of_a_newer_format_is_refused(tmp_path: Path, key: keys.Key) -> None:
    path = tmp_path / "f"
    _seal(path, b"secret", key)
    data = bytearray(path.read_bytes())
    data[len(sealed.MAGIC)] = sealed.VERSION + 1
    path.write_bytes(data)
    with pytest.raises(ArchiveCorruptError, match="version 2; this kerrickpt reads version 1"):
        _open(path, key)


def _archive(path: Path, key: keys.Key | None) -> Manifest:
    with archivewriter.Writer(path, key=key) as writer:
        writer.write("images/pages-1.img", os.urandom(3 << 20) + MARKER + os.urandom(100))
        writer.end("images/pages-1.img")
        writer.write("images/core-1.img", b"core")
        writer.end("images/core-1.img")
        return writer.commit(manifest())


def test_a_sealed_archive_holds_nothing_in_the_clear_and_reads_back_only_with_its_key(
    tmp_path: Path, key: keys.Key
) -> None:
    plain, locked = tmp_path / "plain.kckpt", tmp_path / "sealed.kckpt"
    _archive(plain, None)
    written = _archive(locked, key)

    assert MARKER in plain.read_bytes() and MARKER not in locked.read_bytes()
    assert locked.stat().st_mode & 0o777 == 0o600
    assert archive.sealing(plain) is None
    header = archive.sealing(locked)
    assert header is not None and (header.key_id, header.sealing) == (key.id, key.sealing)
    dest = tmp_path / "out"
    dest.mkdir()
    assert archive.extract(locked, dest, key=key).members == written.members
    assert MARKER in (dest / "images" / "pages-1.img").read_bytes()
    index = archive.read_index(locked, key)
    assert index is not None and index.files == {"images/core-1.img": b"core"}
    assert archive.read_manifest(locked, key).name == "demo"
    pages = next(m for m in written.members if m.name == "images/pages-1.img")
    with archive.MemberReader(locked, pages, written.checksum, key) as member:
        assert MARKER in member.read()
        member.finish()
    with pytest.raises(KeyUnusableError, match=key.id):
        archive.verify(locked)


def test_bytes_changed_in_a_sealed_archive_are_refused_as_corrupt(tmp_path: Path, key: keys.Key) -> None:
    good = tmp_path / "a.kckpt"
    _archive(good, key)
    data = good.read_bytes()
    bad = tmp_path / "bad.kckpt"
    for at in [*range(len(sealed.MAGIC)), len(sealed.MAGIC), HEADER - 1, HEADER, len(data) // 2, len(data) - 1]:
        changed = bytearray(data)
        changed[at] ^= 1
        bad.write_bytes(changed)
        with pytest.raises(ArchiveCorruptError):
            archive.verify(bad, key)
        bad.unlink()


def test_a_plain_archive_is_refused_when_a_key_is_given(tmp_path: Path, key: keys.Key) -> None:
    plain = tmp_path / "plain.kckpt"
    _archive(plain, None)
    assert archive.verify(plain).name == "demo"
    with pytest.raises(ArchiveCorruptError, match="not encrypted, but a key was given"):
        archive.verify(plain, key)


def test_inspect_shows_how_an_archive_is_sealed_without_its_key_and_the_rest_with_it(
    tmp_path: Path, key: keys.Key
) -> None:
    locked = tmp_path / "sealed.kckpt"
    _archive(locked, key)
    shown = cli("inspect", str(locked))
    assert shown.returncode == 0, shown.stderr
    assert f"key {key.id}" in shown.stdout and keys.NAMES[key.sealing] in shown.stdout
    assert "demo" not in shown.stdout
    listed = json.loads(cli("inspect", str(locked), "--json").stdout)
    assert listed["encryption"]["key_id"] == key.id and "name" not in listed
    opened = json.loads(cli("inspect", str(locked), "--json", "--key-file", str(tmp_path / "key")).stdout)
    assert opened["name"] == "demo" and opened["encryption"]["method"] == keys.NAMES[key.sealing]
    keys.create(tmp_path / "other")
    wrong = cli("inspect", str(locked), "--key-file", str(tmp_path / "other"))
    assert wrong.returncode == 23 and key.id in wrong.stderr
    against = cli("check", "--against", str(locked))
    assert against.returncode == 23 and f"with key {key.id}" in against.stderr


def test_checkpoint_encrypt_needs_a_key_and_a_key_needs_encrypt(tmp_path: Path) -> None:
    out = str(tmp_path / "a.kckpt")
    keyless = cli("checkpoint", "x", "-o", out, "--encrypt", KERRICKPT_KEY_FILE="")
    assert keyless.returncode == 2 and "--encrypt needs a key" in keyless.stderr
    keys.create(tmp_path / "key")
    unsaid = cli("checkpoint", "x", "-o", out, "--key-file", str(tmp_path / "key"))
    assert unsaid.returncode == 2 and "add --encrypt" in unsaid.stderr
    assert not (tmp_path / "a.kckpt").exists()


@pytest.mark.root
def test_an_encrypted_checkpoint_holds_no_memory_in_the_clear_and_restores_with_its_key_only(
    state_dir: Path, tmp_path: Path, key: keys.Key
) -> None:
    secret = f"kerrickpt-marker-{os.urandom(16).hex()}"
    (tmp_path / "secret").write_text(secret + "\n")
    name = unique_name("sealed")
    # The marker is only in the shell's memory: read from a file that is gone before the checkpoint.
    count = 'i=0; while :; do i=$((i+1)); echo "tick $i pid $$"; sleep 0.05; done'
    script = f"read secret < {tmp_path / 'secret'}; {count}"
    kerrickpt.run(name, ["/bin/sh", "-c", script], state_dir=state_dir)
    log = state_dir / "containers" / name / "log"
    wait_for(lambda: ticks(log.read_text()), what="the counter")
    (tmp_path / "secret").unlink()
    archive_path = tmp_path / "w.kckpt"
    key_file = str(tmp_path / "key")

    taken = cli("checkpoint", name, "-o", str(archive_path), "--encrypt", "--key-file", key_file, state_dir=state_dir)

    assert taken.returncode == 0, taken.stderr
    assert f"encrypted with key {key.id}" in taken.stdout
    assert secret.encode() not in archive_path.read_bytes()
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    archive.extract(archive_path, unpacked, key=key)
    pages = b"".join(p.read_bytes() for p in (unpacked / "images").glob("pages-*.img"))
    assert secret.encode() in pages, "the archive carries the shell's memory, marker and all"
    last = max(ticks((unpacked / "log").read_text()))
    keyless = cli("restore", str(archive_path), state_dir=state_dir)
    assert keyless.returncode == 23 and key.id in keyless.stderr
    keys.create(tmp_path / "other")
    wrong = cli("restore", str(archive_path), "--key-file", str(tmp_path / "other"), state_dir=state_dir)
    assert wrong.returncode == 23 and key.id in wrong.stderr and keys.load(tmp_path / "other").id in wrong.stderr
    assert kerrickpt.ps(state_dir) == []

    restored = cli("restore", str(archive_path), "--key-file", key_file, state_dir=state_dir)

    assert restored.returncode == 0, restored.stderr
    wait_for(lambda: max(ticks(log.read_text())) > last + 2, what="the counter to go on")
    assert_consecutive(ticks(log.read_text()))


@pytest.mark.root
@pytest.mark.parametrize("where", ["memory", "end"])
def test_a_changed_byte_in_an_encrypted_archive_is_refused_before_any_restored_process_runs(
    memload: Path, state_dir: Path, tmp_path: Path, key: keys.Key, where: str
) -> None:
    _, side, good = checkpointed_side_writer(memload, 64, state_dir, tmp_path, key)
    data = bytearray(good.read_bytes())
    data[len(data) // 2 if where == "memory" else len(data) - 1] ^= 1
    bad = tmp_path / "bad.kckpt"
    bad.write_bytes(data)
    ticks_before = side.stat().st_size

    refused = cli("restore", str(bad), "--key-file", str(tmp_path / "key"), state_dir=state_dir)

    assert refused.returncode == 6, refused.stderr
    assert "fails its authentication" in refused.stderr
    assert side.stat().st_size == ticks_before, "no restored process ever ran"
    assert kerrickpt.ps(state_dir) == []
