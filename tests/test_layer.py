"""A container's writable layer travels in an archive: owners move to the target's id range, the overlay's
whiteouts and opaque directories keep hiding lower files, and a hostile layer is refused before it writes anything."""

from __future__ import annotations

import io
import os
import socket
import stat
import struct
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from kerrickpt import layer
from kerrickpt.errors import ArchiveCorruptError, HostError, NotCheckpointable
from kerrickpt.idmap import IdMap

pytestmark = pytest.mark.root

IDS = 65536
SOURCE = (3_000_000, 3_200_000)  # uid_base, gid_base on the node that packs
TARGET = (5_000_000, 5_200_000)  # and on the node that unpacks
OPAQUE = "trusted.overlay.opaque"
NOTES_TIME = 1_600_000_000_123_456_789


def _capability(revision: int, permitted: int, root: int | None = None) -> bytes:
    """A security.capability value with the effective flag (as `setcap cap_x+ep` writes it)."""
    words = [revision | 1, permitted, 0, 0, 0] + ([] if root is None else [root])
    return struct.pack(f"<{len(words)}I", *words)


CAP_NET_RAW = 1 << 13
CAPS_V3 = _capability(0x03000000, CAP_NET_RAW, SOURCE[0])


def _pack(upper: Path, bases: tuple[int, int] = SOURCE) -> bytes:
    pieces: list[bytes] = []
    written, _ = layer.pack(upper, IdMap.shifted(*bases, IDS), pieces.append)
    data = b"".join(pieces)
    assert written == len(data)
    return data


def _unpack(data: bytes, upper: Path, bases: tuple[int, int] = TARGET) -> int:
    return layer.unpack(io.BytesIO(data), upper, IdMap.shifted(*bases, IDS))


def _own(path: Path, uid: int, gid: int, bases: tuple[int, int] = SOURCE) -> None:
    os.chown(path, bases[0] + uid, bases[1] + gid, follow_symlinks=False)


def _make(path: Path, kind: str, mode: int, uid: int = 0, gid: int = 0, data: bytes = b"") -> Path:
    if kind == "dir":
        path.mkdir()
    elif kind == "file":
        path.write_bytes(data)
    _own(path, uid, gid)
    path.chmod(mode)
    return path


def _source_layer(upper: Path) -> None:
    """What a container's processes leave in its layer, as the overlay writes it on the host."""
    _make(upper, "dir", 0o755)
    _make(upper / "etc", "dir", 0o755)
    _make(upper / "etc" / "motd", "file", 0o644, data=b"welcome\n")
    _make(upper / "home", "dir", 0o755)
    home = _make(upper / "home" / "ann", "dir", 0o700, 1000, 1001)
    notes = _make(home / "notes", "file", 0o600, 1000, 1001, data=b"step 1\n" * 5000)
    os.link(notes, home / "notes.hard")
    for name, target in (("motd", "/etc/motd"), ("up", "../../etc"), ("far", "../../../../etc")):
        (home / name).symlink_to(target)
        _own(home / name, 1000, 1001)
    os.utime(notes, ns=(NOTES_TIME, NOTES_TIME))
    run = _make(upper / "run", "dir", 0o755)
    os.mkfifo(run / "pipe")
    _own(run / "pipe", 1000, 1001)
    (run / "pipe").chmod(0o620)
    with socket.socket(socket.AF_UNIX) as listener:  # a server's socket: CRIU binds it again, it does not travel
        listener.bind(str(run / "sock"))
    os.mknod(upper / "gone", stat.S_IFCHR, os.makedev(0, 0))  # the overlay's whiteout of a deleted lower file
    _own(upper / "gone", 0, 0)
    opaque = _make(upper / "opaque", "dir", 0o755)
    os.setxattr(opaque, OPAQUE, b"y")
    _make(opaque / "new", "file", 0o644, data=b"only this\n")
    copied_up = _make(upper / "var", "dir", 0o755)  # copied up from a lower directory of the host's root
    os.chown(copied_up, 0, 0)
    _make(upper / "bin", "dir", 0o755)
    tool = _make(upper / "bin" / "tool", "file", 0o755, data=b"#!/bin/sh\n")
    os.setxattr(tool, "security.capability", CAPS_V3)
    os.setxattr(tool, "user.origin", b"\x00downloaded\xff")
    os.setxattr(upper / "home", "user.quota=soft", b"1G")
    _make(upper / "bin" / "su", "file", 0o4755, data=b"#!/bin/sh\n")
    sparse = _make(upper / "sparse", "file", 0o644, 1000, 1001)
    with sparse.open("r+b") as fh:
        fh.seek(16 << 20)
        fh.write(b"end")
    odd = os.path.join(os.fsencode(upper), b"caf\xe9")  # a name that is not UTF-8
    with open(odd, "wb") as fh:
        fh.write(b"latin-1\n")
    os.chown(odd, SOURCE[0], SOURCE[1])


def _describe(upper: Path, bases: tuple[int, int]) -> dict[bytes, tuple[object, ...]]:
    """Every entry of a layer as a user of the container sees it: kind, mode, owner inside, time, contents."""
    entries = {}
    top = os.fsencode(upper)
    for directory, dirs, files in os.walk(top):
        for name in [*dirs, *files, *([b"."] if directory == top else [])]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            uid, gid = st.st_uid - bases[0], st.st_gid - bases[1]
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    content: object = fh.read()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = st.st_rdev if stat.S_ISCHR(st.st_mode) else None
            xattrs = {x: os.getxattr(path, x) for x in os.listxattr(path, follow_symlinks=False)}
            entries[os.path.relpath(path, top)] = (st.st_mode, uid, gid, st.st_mtime_ns, content, xattrs)
    return entries


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, bytes]:
    upper = tmp_path / "source-upper"
    _source_layer(upper)
    return upper, _pack(upper)


def test_a_layer_unpacked_in_another_id_range_is_the_same_layer_as_the_container_sees_it(
    packed: tuple[Path, bytes], tmp_path: Path
) -> None:
    source, data = packed
    expected = _describe(source, SOURCE)
    target = tmp_path / "target-upper"

    written = _unpack(data, target)

    found = _describe(target, TARGET)
    del expected[b"run/sock"]  # not carried
    mode, _, _, mtime, content, xattrs = expected.pop(b"var")
    assert found.pop(b"var") == (mode, layer.NOBODY, layer.NOBODY, mtime, content, xattrs), "an id it did not own"
    far = found.pop(b"home/ann/far")
    assert far[4] == b"../../etc", "climbing above the root ends at the root, as it does inside the container"
    assert far[:4] == expected.pop(b"home/ann/far")[:4]
    capability = found[b"bin/tool"][5].pop("security.capability")
    assert capability == CAPS_V3[:20] + struct.pack("<I", TARGET[0]), "its root is the target's container root"
    del expected[b"bin/tool"][5]["security.capability"]
    assert found == expected
    assert found[b"home/ann/notes"][3] == NOTES_TIME and found[b"bin/su"][0] == stat.S_IFREG | 0o4755
    assert os.stat(target / "home/ann/notes").st_ino == os.stat(target / "home/ann/notes.hard").st_ino
    assert os.stat(target / "sparse").st_blocks * 512 < 1 << 20, "a hole stays a hole"
    assert len(data) < 1 << 20, "and is not carried as 16 MiB of zeros"
    files = {st.st_ino: st.st_size for st in map(os.lstat, target.rglob("*")) if stat.S_ISREG(st.st_mode)}
    assert written == sum(files.values())


def test_an_overlay_of_the_unpacked_layer_hides_what_the_container_deleted(
    packed: tuple[Path, bytes], tmp_path: Path
) -> None:
    lower = tmp_path / "lower"
    for name in ("gone", "keep", "opaque/hidden", "etc/motd"):
        (lower / name).parent.mkdir(parents=True, exist_ok=True)
        (lower / name).write_text("lower\n")
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    work.mkdir()
    merged.mkdir()
    _unpack(packed[1], upper)
    # The mount lives in a private mount namespace and goes with it.
    script = 'mount -t overlay overlay -o lowerdir="$1",upperdir="$2",workdir="$3" "$4" && cd "$4" && ls -A . opaque'
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", lower, upper, work, merged],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
    )

    assert run.returncode == 0, run.stderr
    top, opaque = run.stdout.split("\n\n")
    assert "keep" in top.split() and "home" in top.split(), "the lower and the upper layers both show"
    assert "gone" not in top.split(), "the whiteout hides the file the container deleted"
    assert opaque.split()[1:] == ["new"], "the opaque directory hides the lower one's entries"


def test_what_a_restore_could_not_recreate_is_refused_at_the_checkpoint(tmp_path: Path) -> None:
    upper = _make(tmp_path / "upper", "dir", 0o755)
    os.mknod(upper / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(NotCheckpointable, match="device node /null"):
        _pack(upper)
    os.unlink(upper / "null")
    (upper / "link").symlink_to("dir/../../etc")
    with pytest.raises(NotCheckpointable, match="/link"):
        _pack(upper)
    os.unlink(upper / "link")
    os.setxattr(_make(upper / "moved", "dir", 0o755), "trusted.overlay.redirect", b"/elsewhere")
    with pytest.raises(NotCheckpointable, match="redirect"):
        _pack(upper)


Entry = tuple[tarfile.TarInfo, bytes]


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields: object) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, len(data), 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def _tar(*members: Entry) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _sparse(name: str, head: bytes, data: bytes, size: int) -> Entry:
    """A member in GNU's sparse format 1.0: the map of its data runs, then the runs."""
    sparse = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(size)}
    return _entry(name, data=head + bytes(-len(head) % tarfile.BLOCKSIZE) + data, pax_headers=sparse)


HOSTILE = {
    "absolute name": lambda outside: [_entry(str(outside / "pwned"), data=b"x")],
    "dot-dot": lambda outside: [_entry("../outside/pwned", data=b"x")],
    "write through a link": lambda outside: [
        _entry("link", tarfile.SYMTYPE, linkname=str(outside)),
        _entry("link/pwned", data=b"x"),
    ],
    "hard link to /etc/passwd": lambda outside: [_entry("passwd", tarfile.LNKTYPE, linkname="/etc/passwd")],
    "hard link out": lambda outside: [_entry("target", tarfile.LNKTYPE, linkname="../outside/target")],
    "hard link to a link": lambda outside: [
        _entry("dir", tarfile.DIRTYPE),
        _entry("dir/up", tarfile.SYMTYPE, linkname="../ok"),
        _entry("up", tarfile.LNKTYPE, linkname="dir/up"),
    ],
    "hard link to a directory": lambda outside: [
        _entry("dir", tarfile.DIRTYPE),
        _entry("again", tarfile.LNKTYPE, linkname="dir"),
    ],
    "top is a link": lambda outside: [_entry(".", tarfile.SYMTYPE, linkname=str(outside))],
    "block device": lambda outside: [_entry("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)],
    "character device": lambda outside: [_entry("null", tarfile.CHRTYPE, devmajor=1, devminor=3)],
    "id out of range": lambda outside: [_entry("mine", data=b"x", uid=IDS)],
    "relative link climbing out": lambda outside: [
        _entry("dir", tarfile.DIRTYPE),
        _entry("dir/etc", tarfile.SYMTYPE, linkname="../../../etc"),
    ],
    "a name twice": lambda outside: [_entry("ok", tarfile.SYMTYPE, linkname=str(outside / "target"))],
    "sparse map out of order": lambda outside: [_sparse("holes", b"2\n100\n4\n0\n4\n", b"abcdefgh", 200)],
    "sparse map past the end": lambda outside: [_sparse("holes", b"1\n196\n8\n", b"abcdefgh", 200)],
    "sparse map not numbers": lambda outside: [_sparse("holes", b"1\nx\n4\n", b"abcd", 200)],
    "an attribute not a program's": lambda outside: [
        _entry("dir", tarfile.DIRTYPE, pax_headers={layer.PAX_USER: '{"trusted.overlay.opaque": "79"}'})
    ],
    "unknown header": lambda outside: [_entry("new", pax_headers={"KERRICKPT.future": "1"})],
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_layer_is_refused_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("host file\n")
    before = sorted(os.listdir(outside)), os.stat("/etc/passwd").st_nlink
    upper = tmp_path / "upper"
    data = _tar(_entry(".", tarfile.DIRTYPE), _entry("ok", data=b"fine\n"), *HOSTILE[case](outside))

    with pytest.raises(ArchiveCorruptError):
        _unpack(data, upper)

    assert not upper.exists(), "nothing half-unpacked is left"
    assert (sorted(os.listdir(outside)), os.stat("/etc/passwd").st_nlink) == before
    assert (outside / "target").read_text() == "host file\n" and (outside / "target").stat().st_nlink == 1


def test_a_cut_layer_is_refused_and_an_empty_directory_given_stays_empty(
    packed: tuple[Path, bytes], tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()

    with pytest.raises(ArchiveCorruptError):
        _unpack(packed[1][: len(packed[1]) // 2], upper)

    assert upper.is_dir() and not os.listdir(upper)
    (upper / "left over").touch()
    with pytest.raises(HostError, match="not empty"):
        _unpack(packed[1], upper)


def _pack_indexed(upper: Path, base: layer.Index | None = None) -> tuple[bytes, layer.Index]:
    pieces: list[bytes] = []
    _, index = layer.pack(upper, IdMap.shifted(*SOURCE, IDS), pieces.append, base)
    return b"".join(pieces), index


def _change(upper: Path) -> None:
    """What a container does to its layer between two snapshots: a little of everything."""
    with (upper / "home/ann/notes").open("ab") as fh:  # a file with two names grows
        fh.write(b"step 2\n")
    (upper / "etc/motd").unlink()
    (upper / "home/ann").chmod(0o750)
    os.chown(upper / "bin/tool", SOURCE[0] + 5, SOURCE[1] + 5)
    os.removexattr(upper / "home", "user.quota=soft")
    os.unlink(upper / "home/ann/motd")
    (upper / "home/ann/motd").symlink_to("/etc/issue")
    for name in ("run/pipe", "run/sock"):
        os.unlink(upper / name)
    (upper / "run").rmdir()
    (upper / "run").write_bytes(b"a file where a directory was\n")
    (upper / "sparse").unlink()
    _make(upper / "sparse", "dir", 0o755)
    _make(upper / "sparse" / "inside", "file", 0o600, 1000, 1001, data=b"a directory where a file was\n")
    (upper / "bin/su").rename(upper / "bin/su2")
    _make(upper / "opaque" / "newer", "file", 0o644, data=b"new\n")


def test_a_delta_over_its_base_makes_the_layer_as_a_whole_one_would(tmp_path: Path) -> None:
    source = tmp_path / "source-upper"
    _source_layer(upper=source)
    os.setxattr(source, "user.top", b"the layer's top loses it")
    time.sleep(layer.RACY_NS / 1e9)  # settled: an entry changed just before the read is carried again anyway
    whole, index = _pack_indexed(source)
    target = tmp_path / "target-upper"
    _unpack(whole, target)
    _change(source)
    os.removexattr(source, "user.top")

    delta, _ = _pack_indexed(source, index)
    removed = _pack_indexed(source)[1].removed_since(index)
    layer.apply(io.BytesIO(delta), removed, target, IdMap.shifted(*TARGET, IDS))

    fresh = tmp_path / "fresh-upper"
    _unpack(_pack(source), fresh)
    assert _describe(target, TARGET) == _describe(fresh, TARGET)
    assert os.stat(target / "home/ann/notes").st_ino == os.stat(target / "home/ann/notes.hard").st_ino
    assert removed == ["bin/su", "etc/motd", "run/pipe"], "only what went, each name once"
    with tarfile.open(fileobj=io.BytesIO(delta)) as tar:
        carried = set(tar.getnames())
    assert {"bin/su2", "home/ann/notes", "sparse/inside", "opaque"} <= carried
    assert not carried & {"var", "opaque/new", "etc/motd", "bin/su"}, "unchanged entries are not carried"


@pytest.mark.parametrize(
    "removed, entries",
    [
        (["link/target"], []),
        ([], [_entry("link/pwned", data=b"x")]),
        (["not-there"], []),
        (["../outside/target"], []),
    ],
    ids=["remove through a link", "write through a link", "remove what the base lacks", "remove out"],
)
def test_a_delta_that_does_not_fit_its_base_or_leaves_the_layer_is_refused(
    removed: list[str], entries: list[Entry], tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("host file\n")
    upper = tmp_path / "upper"
    _unpack(_tar(_entry(".", tarfile.DIRTYPE), _entry("link", tarfile.SYMTYPE, linkname=str(outside))), upper)

    with pytest.raises(ArchiveCorruptError):
        layer.apply(io.BytesIO(_tar(*entries)), removed, upper, IdMap.shifted(*TARGET, IDS))

    assert sorted(os.listdir(outside)) == ["target"] and (outside / "target").read_text() == "host file\n"


def test_an_entry_changed_just_before_the_read_is_carried_again_by_the_next_delta(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "old").write_bytes(b"written long ago\n")
    long_ago = time.time() - 3600
    os.utime(upper / "old", (long_ago, long_ago))
    time.sleep(layer.RACY_NS / 1e9)  # its ctime now lies before the racy window
    (upper / "fresh").write_bytes(b"v1\n")

    _, index = _pack_indexed(upper)
    # Nothing changed since, as far as the attributes can tell: but a write in the clock tick of the read
    # would look just so (same size, same coarse ctime).
    delta, _ = _pack_indexed(upper, index)

    with tarfile.open(fileobj=io.BytesIO(delta)) as tar:
        names = tar.getnames()
    assert "fresh" in names, "an entry changed that close to the read is carried again"
    assert "old" not in names, "an entry settled long before the read is not"
