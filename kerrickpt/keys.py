"""Owns encryption keys: key files, their passphrases, key ids, and sealing bytes with a key (AEAD)."""

from __future__ import annotations

import base64
import itertools
import json
import operator
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from kerrickpt import pagehash
from kerrickpt.errors import ArchiveCorruptError, KeyUnusableError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

# cryptography is imported where a key is used, not here: every command imports this module (the CLI and the
# archive code name Key), and importing cryptography costs some 10 ms, which a command on nothing sealed need not pay.

FORMAT = "kerrickpt-key"
VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12  # both AEADs'
TAG_BYTES = 16  # both AEADs'
ID_BYTES = 8  # a key id: 16 hex digits, enough to tell keys apart, nothing about the key
MAX_FILE = 4096  # a key file is well under this; more is not one
# Sealings, as a sealed object records them: a reader opens what any node sealed, whatever its own CPU.
AES_GCM = 1
CHACHA20_POLY1305 = 2
NAMES = {AES_GCM: "AES-256-GCM", CHACHA20_POLY1305: "ChaCha20-Poly1305"}
# scrypt's cost for a key file's passphrase: 2^17 x 8 x 128 bytes = 128 MiB and about 0.3 s, once per command.
SCRYPT = {"n": 1 << 17, "r": 8, "p": 1}
# The most a key file may ask of scrypt (n up to 1 GiB of memory at r 8): anyone who can write the file could
# otherwise make every command that loads it take all the node's memory or hours.
SCRYPT_LIMITS = {"n": 1 << 20, "r": 32, "p": 16}

Passphrase = Callable[[], bytes]  # asked only when a key file holds its key under a passphrase


def default_sealing() -> int:
    """AES-256-GCM where the CPU has AES instructions (x86's `aes`, arm64's `aes` feature), ChaCha20-Poly1305
    otherwise: without them, AES in software is slower and not constant-time."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return CHACHA20_POLY1305
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return AES_GCM if "aes" in value.split() else CHACHA20_POLY1305
    return CHACHA20_POLY1305


def _derive(master: bytes, label: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"kerrickpt " + label.encode()).derive(
        master
    )


@dataclass(frozen=True)
class Key:
    """A store's or an archive's key: seals and opens bytes, and names content without revealing it.

    From the key file's random master key, HKDF derives one key per use, so that no two uses share one: sealing,
    one per method (`seal`/`open`), content addresses (`address`) and the key id (`id`, which says which key without
    helping to find it). A sealed file or a store seals with a key of its own (`derived`), not this one.
    """

    master: bytes = field(repr=False)
    sealing: int = field(default_factory=default_sealing)  # what `seal` uses; `open` takes what the object names

    @cached_property
    def id(self) -> str:
        return _derive(self.master, "key id")[:ID_BYTES].hex()

    @cached_property
    def address_key(self) -> bytes:
        """The key of `address`: what a store's page-hashing workers are given (see pagehash)."""
        return _derive(self.master, "address")

    @cached_property
    def _aeads(self) -> dict[int, AESGCM | ChaCha20Poly1305]:
        # Made once: a store seals and opens a chunk per 4 KiB page, and making one costs a third of opening it.
        # They keep no state between calls, so threads share them.
        # Each method its own key: one key under two AEADs is a pairing neither was proven safe in.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

        aeads = {AES_GCM: AESGCM, CHACHA20_POLY1305: ChaCha20Poly1305}
        return {sealing: aead(_derive(self.master, f"seal {sealing}")) for sealing, aead in aeads.items()}

    def _aead(self, sealing: int) -> AESGCM | ChaCha20Poly1305:
        try:
            return self._aeads[sealing]
        except KeyError:
            raise ArchiveCorruptError(f"sealed with an unknown method ({sealing})") from None

    def seal(self, data: bytes | memoryview, bound: bytes) -> bytes:
        """`data` encrypted and authenticated with `bound` (bytes that must be the same to open it: where it
        belongs, so that sealed pieces cannot be swapped): a random nonce, then the ciphertext and its tag."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead(self.sealing).encrypt(nonce, data, bound)  # a view is not copied first

    def seal_into(self, data: bytes | memoryview, bound: bytes, buffer: bytearray | memoryview) -> memoryview:
        """`seal`, written into the start of `buffer` (room for NONCE_BYTES + len(data) + TAG_BYTES at least), which
        it returns cut to that: who seals megabytes at a time reuses one buffer, as memory fresh for each (its pages
        faulted in, then a copy to put the nonce first) cost several times what the cipher does. Not for small
        pieces: for a 4 KiB chunk its views cost more than the copy they save (some 1.8 us against `seal`'s 1.1)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = memoryview(buffer)[: NONCE_BYTES + len(data) + TAG_BYTES]
        sealed[:NONCE_BYTES] = nonce
        self._aead(self.sealing).encrypt_into(nonce, data, bound, sealed[NONCE_BYTES:])  # a view is not copied first
        return sealed

    def open(self, sealed: bytes | memoryview, bound: bytes, sealing: int, what: str) -> bytes:
        """The bytes `seal` sealed with `sealing` and `bound`; ArchiveCorruptError naming `what` if they were changed
        (or `bound` is not theirs): with the right key, that can only be tampering or damage."""
        if len(sealed) < NONCE_BYTES + TAG_BYTES:
            raise ArchiveCorruptError(f"{what} is truncated: shorter than its seal")
        view = memoryview(sealed)
        try:
            return self._aead(sealing).decrypt(bytes(view[:NONCE_BYTES]), view[NONCE_BYTES:], bound)
        except Exception as exc:
            self._refuse_forged(exc, what)
            raise

    def open_many(self, sealed: list[memoryview], bounds: Iterable[bytes], sealings: bytes, what: str) -> list[bytes]:
        """`open` for many pieces, each with its bound and its sealing (a byte each), by one loop in C (a store opens a
        chunk per 4 KiB page); ArchiveCorruptError naming `what` if one fails, without saying which."""
        if sealed and min(map(len, sealed)) < NONCE_BYTES + TAG_BYTES:
            raise ArchiveCorruptError(f"{what} is truncated: shorter than its seal")
        decrypt = {sealing: self._aead(sealing).decrypt for sealing in set(sealings)}
        nonces = map(operator.getitem, sealed, itertools.repeat(slice(NONCE_BYTES)))
        texts = map(operator.getitem, sealed, itertools.repeat(slice(NONCE_BYTES, None)))
        try:
            return list(map(operator.call, map(decrypt.__getitem__, sealings), nonces, texts, bounds))
        except Exception as exc:
            self._refuse_forged(exc, what)
            raise

    def _refuse_forged(self, exc: Exception, what: str) -> None:
        """ArchiveCorruptError naming `what` if `exc` is a seal's failing to open: with the right key, that can only be
        tampering or damage. Anything else is left to the caller to raise."""
        # Imported on failure only: a chunk is opened per page, and an import costs as much as half an opening.
        from cryptography.exceptions import InvalidTag

        if isinstance(exc, InvalidTag):
            raise ArchiveCorruptError(
                f"{what} fails its authentication with key {self.id}: it was changed, or damaged, after it was sealed"
            ) from None

    def derived(self, context: bytes) -> Key:
        """A key of one object's own (a sealed file of many segments, a store of many chunks), from this key and
        `context` (random, recorded with the object): random nonces stay far from their limit (2^32 seals with one
        key) however many objects this key seals, and two stores' addresses of equal content differ. Its id is not
        this key's: check this key against the object first."""
        return Key(_derive(self.master, "object " + context.hex()), self.sealing)

    @cached_property
    def address(self) -> Callable[[bytes | memoryview], bytes]:
        """A keyed digest of bytes (HMAC-SHA256) to find them by: equal content, equal address, but without the key
        nobody can tell whether a chunk holds content they can guess, as a plain sha256 would let them."""
        return pagehash.addresser(self.address_key)

    def check(self, expected: str, what: str) -> None:
        """Refuse (KeyUnusableError) if `what` was sealed with key `expected`, not this one."""
        if expected != self.id:
            raise KeyUnusableError(f"{what} is sealed with key {expected}; the key given is {self.id}")


def _wrapping(passphrase: bytes, salt: bytes, cost: dict[str, int]) -> ChaCha20Poly1305:
    if set(cost) != set(SCRYPT_LIMITS) or any(
        type(cost[name]) is not int or not 1 <= cost[name] <= most for name, most in SCRYPT_LIMITS.items()
    ):
        raise KeyUnusableError(f"the key file's passphrase settings {cost} are not usable: at most {SCRYPT_LIMITS}")
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    try:
        return ChaCha20Poly1305(Scrypt(salt=salt, length=KEY_BYTES, **cost).derive(passphrase))
    except (TypeError, ValueError) as exc:  # cost parameters a newer kerrickpt or an editor wrote
        raise KeyUnusableError(f"the key file's passphrase settings are not usable: {exc}") from None


def create(path: Path, passphrase: bytes | None = None) -> Key:
    """A new random key written to `path` (mode 0600, never over an existing file), under `passphrase` if given
    (scrypt, then ChaCha20-Poly1305 around the key). Back the file up: without it, what it sealed is lost."""
    key = Key(os.urandom(KEY_BYTES))
    record: dict[str, object] = {"format": FORMAT, "version": VERSION, "id": key.id}
    if passphrase is None:
        record["key"] = base64.b64encode(key.master).decode()
    else:
        salt, nonce = os.urandom(16), os.urandom(NONCE_BYTES)
        wrapped = _wrapping(passphrase, salt, SCRYPT).encrypt(nonce, key.master, key.id.encode())
        record["scrypt"] = {**SCRYPT, "salt": base64.b64encode(salt).decode()}
        record["wrapped"] = base64.b64encode(nonce + wrapped).decode()
    from kerrickpt.archivewriter import fsync_dir  # here: archivewriter seals with a Key, so imports this module

    # Whole and on disk under a hidden name, then linked to `path`: never half a key file, never over one.
    hidden = path.parent / f".{path.name}.{os.urandom(8).hex()}.tmp"
    try:
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.link(hidden, path)
        finally:
            hidden.unlink(missing_ok=True)
        fsync_dir(path.parent)
    except FileExistsError:
        raise KeyUnusableError(f"{path} exists: a key file is never written over (it may be the only copy)") from None
    except OSError as exc:
        raise KeyUnusableError(f"cannot create the key file {path}: {exc.strerror}") from exc
    return key


def load(path: Path, passphrase: Passphrase | None = None) -> Key:
    """The key in the key file `path`, which must be a regular file of this user's that nobody else may read or
    write (0600 or stricter). `passphrase` is called if the key is held under one; KeyUnusableError if the file is
    missing, too open, not a key file, or the passphrase is wrong or not given."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyUnusableError(f"cannot read the key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyUnusableError(f"the key file {path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise KeyUnusableError(
                f"refusing the key file {path}: it is owned by uid {st.st_uid} with mode "
                f"{stat.S_IMODE(st.st_mode):04o}; it must be yours and 0600 (chmod 600), as anyone who reads it can "
                "read what it sealed"
            )
        raw = fh.read(MAX_FILE + 1)
    try:
        record = json.loads(raw) if len(raw) <= MAX_FILE else None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError("not a kerrickpt key file")
        if record.get("version") != VERSION:
            raise ValueError(f"its version {record.get('version')} is not {VERSION}, the one this kerrickpt reads")
        if "key" in record:
            master = base64.b64decode(record["key"], validate=True)
        else:
            cost = dict(record["scrypt"])
            salt = base64.b64decode(cost.pop("salt"), validate=True)
            wrapped = base64.b64decode(record["wrapped"], validate=True)
            if passphrase is None:
                raise KeyUnusableError(f"the key file {path} is protected by a passphrase, and none was given")
            from cryptography.exceptions import InvalidTag

            try:
                master = _wrapping(passphrase(), salt, cost).decrypt(
                    wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], str(record["id"]).encode()
                )
            except InvalidTag:
                raise KeyUnusableError(f"wrong passphrase for the key file {path}") from None
        if len(master) != KEY_BYTES:
            raise ValueError("its key is not 32 bytes")
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyUnusableError(f"{path} is not a usable key file: {exc}") from None
    key = Key(master)
    if record.get("id") != key.id:
        raise KeyUnusableError(f"the key file {path} is damaged: its key does not have the id it records")
    return key
