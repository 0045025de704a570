"""Key files and sealing: what a user sees when a key is missing, wrong, too open, or what it sealed was changed."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from kerrickpt import keys
from kerrickpt.errors import ArchiveCorruptError, KeyUnusableError
from tests.helpers import cli


def test_a_sealed_piece_opens_only_unchanged_with_its_key_and_where_it_belongs(tmp_path: Path) -> None:
    key = keys.create(tmp_path / "k")
    for sealing in keys.NAMES:
        sealer = keys.Key(key.master, sealing)
        sealed = sealer.seal(b"page of memory", b"chunk 7")
        assert b"page of memory" not in sealed
        assert key.open(sealed, b"chunk 7", sealing, "chunk 7") == b"page of memory"
        with pytest.raises(ArchiveCorruptError, match="changed"):
            key.open(sealed, b"chunk 8", sealing, "chunk 8")
        for i in range(len(sealed)):
            flipped = bytearray(sealed)
            flipped[i] ^= 1
            with pytest.raises(ArchiveCorruptError):
                key.open(flipped, b"chunk 7", sealing, "chunk 7")
        with pytest.raises(ArchiveCorruptError):
            keys.Key(os.urandom(32)).open(sealed, b"chunk 7", sealing, "chunk 7")


def test_a_key_file_reads_back_the_same_key_and_id(tmp_path: Path) -> None:
    made = keys.create(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    loaded = keys.load(tmp_path / "k")
    assert loaded.id == made.id and len(made.id) == 16
    assert loaded.address(b"x") == made.address(b"x") != keys.create(tmp_path / "other").address(b"x")


def test_a_key_file_is_never_written_over(tmp_path: Path) -> None:
    keys.create(tmp_path / "k")
    before = (tmp_path / "k").read_bytes()
    with pytest.raises(KeyUnusableError, match="exists"):
        keys.create(tmp_path / "k")
    assert (tmp_path / "k").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # nothing left of the refused one


def test_a_passphrase_protects_the_key_file(tmp_path: Path) -> None:
    made = keys.create(tmp_path / "k", b"correct horse")
    assert base64.b64encode(made.master).decode() not in (tmp_path / "k").read_text()
    assert keys.load(tmp_path / "k", lambda: b"correct horse").id == made.id
    with pytest.raises(KeyUnusableError, match="wrong passphrase"):
        keys.load(tmp_path / "k", lambda: b"battery staple")
    with pytest.raises(KeyUnusableError, match="none was given"):
        keys.load(tmp_path / "k")


def test_a_key_file_others_may_read_or_a_damaged_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    keys.create(path)
    path.chmod(0o640)
    with pytest.raises(KeyUnusableError, match="0600"):
        keys.load(path)
    path.chmod(0o600)
    record = json.loads(path.read_text())
    record["id"] = "0" * 16
    path.write_text(json.dumps(record))
    with pytest.raises(KeyUnusableError, match="damaged"):
        keys.load(path)
    path.write_text("not json")
    with pytest.raises(KeyUnusableError, match="not a usable key file"):
        keys.load(path)
    with pytest.raises(KeyUnusableError, match="cannot read"):
        keys.load(tmp_path / "missing")


def test_a_key_file_that_is_a_symlink_or_too_big_is_refused(tmp_path: Path) -> None:
    keys.create(tmp_path / "k")
    (tmp_path / "link").symlink_to(tmp_path / "k")
    with pytest.raises(KeyUnusableError, match="cannot read the key file"):
        keys.load(tmp_path / "link")
    big = tmp_path / "big"
    record = json.loads((tmp_path / "k").read_text())
    big.write_text(json.dumps({**record, "padding": "x" * keys.MAX_FILE}))
    big.chmod(0o600)
    with pytest.raises(KeyUnusableError, match="not a usable key file"):
        keys.load(big)


def test_a_key_file_asking_scrypt_for_too_much_is_refused_before_it_runs(tmp_path: Path) -> None:
    path = tmp_path / "k"
    keys.create(path, b"pass")
    record = json.loads(path.read_text())
    record["scrypt"]["n"] = 1 << 30  # 1 TiB of memory
    path.write_text(json.dumps(record))
    with pytest.raises(KeyUnusableError, match="not usable"):
        keys.load(path, lambda: b"pass")


def test_the_wrong_key_is_named(tmp_path: Path) -> None:
    key = keys.create(tmp_path / "k")
    with pytest.raises(KeyUnusableError, match="sealed with key 00"):
        key.check("0011223344556677", "the archive")
    key.check(key.id, "the archive")


def test_key_create_writes_a_key_file_and_never_over_one(tmp_path: Path) -> None:
    made = cli("key", "create", str(tmp_path / "k"), "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["key_id"] == keys.load(tmp_path / "k").id
    again = cli("key", "create", str(tmp_path / "k"))
    assert again.returncode == 23 and "never written over" in again.stderr
    locked = cli("key", "create", str(tmp_path / "p"), "--passphrase", KERRICKPT_PASSPHRASE="s3cret")
    assert locked.returncode == 0, locked.stderr
    assert keys.load(tmp_path / "p", lambda: b"s3cret").id in locked.stdout
