"""Owns carrying a container's writable file-system layer in an archive: packing it with container-relative ids and
unpacking it safely."""

from __future__ import annotations

import contextlib
import decimal
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kerrickpt import filecaps, manifest, sparse, streamer
from kerrickpt.confinement import Confinement
from kerrickpt.errors import ArchiveCorruptError, DumpFailed, HostError, NotCheckpointable
from kerrickpt.idmap import IdMap

MEMBER = manifest.LAYER  # the archive's member that carries the layer (all of it, or what changed since a base)
REMOVED = "layer-removed.json"  # a delta's member: the names its base has and the layer no longer has
# An id the container does not own (a directory the overlay copied up from a root-owned lower layer, say) is carried
# as the kernel's overflow id: inside the container it already shows as 65534 (nobody), so the container sees the
# same owner after the move. Carrying the host id itself would hand the file to whoever has that id on the target,
# and would let an archive give files to the target's root.
NOBODY = 65534
BLOCK = 64 << 10  # file data is read, written and checked for holes in pieces this big
OUT_BYTES = 1 << 20  # file data is read and handed on in pieces this big
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The overlay's mark of a directory that hides the lower one: trusted.* when the overlay is mounted from the host's
# user namespace, user.* when mounted from the container's (the `userxattr` option).
OPAQUE = ("trusted.overlay.opaque", "user.overlay.opaque")
OPAQUE_VALUES = ("y", "x")
# A renamed lower directory or a file whose data stays in the lower layer: the layer alone does not hold them, and
# overlays mounted with redirect_dir=off and metacopy=off (the kernel's defaults) never make them.
UNCARRIED = tuple(f"{ns}.overlay.{what}" for ns in ("trusted", "user") for what in ("redirect", "metacopy"))
PAX = "KERRICKPT."  # the prefix of the pax headers that carry what tar has no field for
PAX_OPAQUE = PAX + "opaque."  # + the xattr's name
PAX_CAPABILITY = PAX + "capability"
# The attributes programs give their files (user.*, but for the overlay's own, which tie the layer to this node's
# lower layer), as JSON {name: value in hex}: a pax keyword may not hold every character a name may.
PAX_USER = PAX + "user-xattrs"
USER = "user."
PAX_TIME = re.compile(r"-?[0-9]{1,12}(\.[0-9]{1,9})?")  # seconds a file system can hold, to the nanosecond


@dataclass(frozen=True)
class Index:
    """Every entry of a layer as packed, by name: [lstat mode, uid, gid, size, mtime_ns, ctime_ns, inode, link
    target], host ids. What a later delta compares against: any write, chmod, chown, link or rename changes the
    ctime, and the layer is frozen while it is read, so a change after the read has a later ctime."""

    entries: dict[str, list[int | str]]

    @functools.cached_property
    def digest(self) -> str:  # a whole layer's entries: asked several times per snapshot
        return hashlib.sha256(json.dumps(self.entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def removed_since(self, base: Index) -> list[str]:
        """The names `base` has and this layer not, but for those under a removed directory."""
        gone = set(base.entries) - set(self.entries)
        return sorted(name for name in gone if name.rpartition("/")[0] not in gone)


def _attributes(st: os.stat_result, link: str) -> list[int | str]:
    return [st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, link]


# The kernel stamps ctime from a coarse clock: a change just after the read (once thawed) may get the very
# ctime the index holds. An entry that recent is indexed as unseen, so the next delta carries it again (git's
# "racily clean" entries).
RACY_NS = 50_000_000
UNSEEN = -1  # no file's ctime


def _settled(entries: dict[str, list[int | str]], before: int) -> dict[str, list[int | str]]:
    """`entries`, those changed at `before` or later marked unseen."""
    for attributes in entries.values():
        ctime = attributes[5]
        if isinstance(ctime, int) and ctime >= before:
            attributes[5] = UNSEEN
    return entries


def pack(upper: Path, ids: IdMap, out: Callable[[bytes], None], base: Index | None = None) -> tuple[int, Index]:
    """Write the layer at `upper` to `out` as a tar stream (PAX, uncompressed, `.` first, then every entry after
    its directory) whose owners are container ids (as `ids` maps them); returns the bytes written and the
    layer's index. With `base`, only the entries whose attributes differ from it. Memory stays bounded
    whatever the layer's size, but for the index. Raises NotCheckpointable for what the layer may hold but a
    restore may not recreate."""
    tar = _TarStream(out)
    first_names: dict[tuple[int, int], str] = {}  # files with more than one link: the name carried first
    entries: dict[str, list[int | str]] = {}
    for name, path, st in _walk(upper):
        if stat.S_ISSOCK(st.st_mode):
            # A socket file is made by bind() and belongs to its process: CRIU binds a restored listening socket
            # again (an old file in the way would fail that bind), and a program whose socket died makes a new one.
            continue
        link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        entries[name] = _attributes(st, link)
        if base is not None and base.entries.get(name) == entries[name]:
            continue  # a new link to a file changes its ctime: every name of a changed file is carried
        info = _info(name, path, st, ids, link)
        inode = (st.st_dev, st.st_ino)
        if info.isreg() and inode in first_names:
            info.type, info.linkname, info.size = tarfile.LNKTYPE, first_names[inode], 0
        if not info.isreg():
            tar.add(info)
            continue
        if st.st_nlink > 1:
            first_names[inode] = name
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb", buffering=0) as fh:
            runs = sparse.data_runs(fh.fileno(), st.st_size)
            tar.add(info, fh if runs is None else sparse.Member(info, fh, runs))
    tar.close()
    return tar.written, Index(_settled(entries, time.time_ns() - RACY_NS))


def unpack(source: BinaryIO, upper: Path, ids: IdMap) -> int:
    """Recreate at `upper` (which must not exist, or be an empty directory) the layer `pack` wrote to `source`,
    owned by the host ids `ids` maps its ids to; returns the bytes of file data written (runs of zeros
    become holes). The layer's top takes the owner and mode carried for `.` (0755 and the container's root if none).

    Raises ArchiveCorruptError, leaving `upper` empty (gone, if it made it), for an archive that is not such a
    layer: a name that is absolute, holds `..` or passes through a link; a hard link out of the layer; a device other
    than the overlay's whiteout (0:0); an id `ids` does not map; a relative symbolic link that climbs above the layer's
    top. An absolute link target is kept: inside the container it resolves within the container's root, and nothing
    follows links (every directory is opened with O_NOFOLLOW), so no entry is ever made outside `upper`."""
    created = not upper.exists()
    if created:
        upper.mkdir(0o700)
    elif any(upper.iterdir()):
        raise HostError(f"{upper} is not empty: a file-system layer is unpacked only into a new directory")
    try:
        with _Extraction(upper, ids) as extraction:
            return _extract(extraction, source)
    except BaseException:
        _remove(upper, created)
        raise


def apply(source: BinaryIO, removed: Sequence[str], upper: Path, ids: IdMap) -> int:
    """Bring the layer at `upper`, as its base was, to the delta `pack` wrote against that base to `source`: take
    away the `removed` names, then make each entry over what is there (a changed directory keeps what it holds;
    anything else replaces what had its name). Returns the bytes of file data written.

    Refuses what `unpack` refuses, and a removed name the layer does not hold (a delta on another base), with
    ArchiveCorruptError; `upper` is then half changed, and the caller discards it. Nothing is removed or made
    through a link: every directory is opened with O_NOFOLLOW, and a directory is removed below its parent's fd."""
    with _Extraction(upper, ids, over=True) as extraction:
        for name in removed:
            extraction.remove(name)
        return _extract(extraction, source)


def _extract(extraction: _Extraction, source: BinaryIO) -> int:
    try:
        with tarfile.open(mode="r|", fileobj=source) as tar:
            for member in tar:
                extraction.add(member, tar)
    except (tarfile.TarError, ValueError) as exc:  # ValueError: tarfile's reading of a malformed sparse map
        raise ArchiveCorruptError(f"the archive's file-system layer is not a readable tar stream: {exc}") from exc
    extraction.finish()
    return extraction.data


class _TarStream:
    """A tar stream written to `out`: tarfile makes the headers, and file data goes on in pieces as read (tarfile's
    own stream would copy it several times over in 10 KiB pieces)."""

    def __init__(self, out: Callable[[bytes], None]) -> None:
        self.out = out
        self.written = 0

    def _put(self, data: bytes) -> None:
        if data:
            self.out(data)
            self.written += len(data)

    def add(self, info: tarfile.TarInfo, data: BinaryIO | sparse.Member | None = None) -> None:
        self._put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        left = info.size
        while left:
            piece = data.read(min(OUT_BYTES, left)) if data is not None else b""
            if not piece:
                raise DumpFailed(f"/{info.name} in the container's file-system layer shrank while it was packed")
            self._put(piece)
            left -= len(piece)
        self._put(bytes(-info.size % tarfile.BLOCKSIZE))

    def close(self) -> None:
        """The end of the archive: two zero blocks, and zeros to a whole record, as tar writes it."""
        self._put(bytes(2 * tarfile.BLOCKSIZE))
        self._put(bytes(-self.written % tarfile.RECORDSIZE))


def _walk(upper: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    """Every entry of the layer as (its name in the archive, its path, its lstat), `.` first, each directory before
    what it holds, in name order (the same layer packs to the same bytes); never following a link."""
    pending = [(".", str(upper))]
    yield ".", str(upper), os.lstat(upper)
    while pending:
        name, path = pending.pop()
        with os.scandir(path) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        below = []
        for entry in entries:
            child = entry.name if name == "." else f"{name}/{entry.name}"
            st = entry.stat(follow_symlinks=False)
            yield child, entry.path, st
            if stat.S_ISDIR(st.st_mode):
                below.append((child, entry.path))
        pending.extend(reversed(below))


def _info(name: str, path: str, st: os.stat_result, ids: IdMap, link: str) -> tarfile.TarInfo:
    """The tar header that carries one entry of the layer (not a socket: see pack)."""
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    uid, gid = ids.container_uid(st.st_uid), ids.container_gid(st.st_gid)
    info.uid, info.gid = NOBODY if uid is None else uid, NOBODY if gid is None else gid
    info.uname = info.gname = ""  # numeric ids only: names differ between the host and the container
    info.mtime = max(0, st.st_mtime_ns // 10**9)
    info.pax_headers["mtime"] = _pax_time(st.st_mtime_ns)  # to the nanosecond, as the layer had it
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFREG:
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif kind == stat.S_IFDIR:
        info.type = tarfile.DIRTYPE
    elif kind == stat.S_IFLNK:
        info.type = tarfile.SYMTYPE
        info.linkname = _carried_target(name, link)
    elif kind == stat.S_IFIFO:
        info.type = tarfile.FIFOTYPE
    elif kind == stat.S_IFCHR and st.st_rdev == 0:  # the overlay's whiteout: a deleted lower file
        info.type = tarfile.CHRTYPE
    else:
        raise NotCheckpointable(
            f"the container's file-system layer holds the device node /{name}: a restore does not make device nodes "
            "in a layer (they would open the host's devices to the container)"
        )
    if kind in (stat.S_IFREG, stat.S_IFDIR):
        info.pax_headers.update(_xattrs(name, path, ids))
    return info


def _pax_time(ns: int) -> str:
    seconds, fraction = divmod(abs(ns), 10**9)
    return f"{'-' if ns < 0 else ''}{seconds}.{fraction:09d}"


def _carried_target(name: str, target: str) -> str:
    """A symbolic link's target as carried: verbatim, but for a relative target's leading `..` that climb above the
    container's root, which are dropped (the kernel resolves `..` at a root to the root itself, and the directories
    they climb are real ones, so the link leads to the same place inside the container)."""
    carried = _within(name.count("/"), target)
    if carried is None:
        raise NotCheckpointable(
            f"the symbolic link /{name} in the container's file-system layer leads to {target!r}, which climbs above "
            "its root past another name: where it leads depends on what that name is"
        )
    return carried


def _within(depth: int, target: str) -> str | None:
    """`target` of a link `depth` directories below the layer's top, without the leading `..` that climb above the
    top; None if a later `..` climbs above it. An absolute target is returned as it is."""
    if target.startswith("/"):
        return target
    kept: list[str] = []
    named = False
    for part in target.split("/"):
        if part == "..":
            if not depth:
                if named:
                    return None
                continue
            depth -= 1
        elif part not in ("", "."):
            depth += 1
            named = True
        kept.append(part)
    return "/".join(kept) or "."


def _xattrs(name: str, path: str, ids: IdMap) -> dict[str, str]:
    """The pax headers carrying the extended attributes the overlay and the container's programs need."""
    headers = {}
    user: dict[str, str] = {}
    for xattr in os.listxattr(path, follow_symlinks=False):
        if xattr in UNCARRIED:
            raise NotCheckpointable(
                f"/{name} in the container's file-system layer has the overlay attribute {xattr}, which a layer "
                "alone does not carry (mount the overlay with redirect_dir=off,metacopy=off)"
            )
        if xattr in OPAQUE:
            value = os.getxattr(path, xattr, follow_symlinks=False).decode("ascii", "replace")
            if value not in OPAQUE_VALUES:
                raise NotCheckpointable(f"/{name} in the container's file-system layer has {xattr}={value!r}")
            headers[PAX_OPAQUE + xattr] = value
        elif xattr == filecaps.XATTR:
            carried = filecaps.carry(name, os.getxattr(path, xattr, follow_symlinks=False), ids)
            if carried is not None:
                headers[PAX_CAPABILITY] = carried
        elif _users(xattr):
            user[xattr] = os.getxattr(path, xattr, follow_symlinks=False).hex()
    if user:
        headers[PAX_USER] = json.dumps(user)
    return headers


def _users(xattr: str) -> bool:
    return xattr.startswith(USER) and not xattr.startswith(USER + "overlay.")


def _user_xattrs(text: str, member: tarfile.TarInfo) -> dict[str, bytes]:
    try:
        carried = json.loads(text)
        if isinstance(carried, dict) and all(isinstance(n, str) and _users(n) for n in carried):
            return {name: bytes.fromhex(value) for name, value in carried.items()}
    except (ValueError, TypeError):
        pass
    raise ArchiveCorruptError(f"the file-system layer's {member.name!r} carries attributes that are not a program's")


def _parts(name: str) -> tuple[str, ...]:
    """The path components of a carried name below the layer's top; refused if it could lead anywhere else."""
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if name.startswith("/") or "\0" in name or ".." in parts:
        raise ArchiveCorruptError(f"the archive's file-system layer holds {name!r}, a path out of the layer")
    return parts


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * 10**9
    if not PAX_TIME.fullmatch(text):
        raise ArchiveCorruptError(f"the file-system layer's {member.name!r} has the time {text!r}")
    return int(decimal.Decimal(text).scaleb(9))


class _Extraction:
    """A layer being unpacked under `upper`: entries are made relative to directory descriptors opened with
    O_NOFOLLOW from the top down, so a name whose directory is a link (or is missing) is refused, never followed."""

    def __init__(self, upper: Path, ids: IdMap, *, over: bool = False) -> None:
        self.ids = ids
        self.over = over  # entries go over a layer that holds its base (a delta), not into an empty one
        self.top = os.open(upper, DIR_FLAGS)
        if not over:  # the container's root owns its layer's top unless `.` says otherwise
            try:
                os.chown(self.top, *ids.root)
                os.chmod(self.top, 0o755)
            except BaseException:
                os.close(self.top)
                raise
        # Directories a delta changes the entries of without carrying them, with the time they must keep.
        self.touched: dict[tuple[str, ...], int] = {}
        self.parent: tuple[tuple[str, ...], int] | None = None  # the directory of the last entry, kept open
        self.times: list[tuple[tuple[str, ...], int]] = []  # directories' times, set once nothing more goes in them
        self.data = 0

    def __enter__(self) -> _Extraction:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.parent is not None:
            os.close(self.parent[1])
        os.close(self.top)

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        parts = _parts(member.name)
        uid, gid = self._id(member.uid, self.ids.host_uid, member), self._id(member.gid, self.ids.host_gid, member)
        mtime = _mtime_ns(member)
        unknown = [key for key in member.pax_headers if key.startswith(PAX) and not self._known(key, member)]
        if unknown:
            raise ArchiveCorruptError(f"the file-system layer's {member.name!r} carries {unknown}, unknown here")
        if not parts:
            if not member.isdir():
                raise ArchiveCorruptError(f"the file-system layer's top {member.name!r} is not a directory")
            if self.over:
                self._clear(self.top)
            self._settle(self.top, member, uid, gid)
            self.times.append(((), mtime))
            return
        parent = self._parent(parts)
        if self.over:
            self._touch(parts[:-1], parent)
            before = self._existing(parts[-1], parent)
            if before is not None and stat.S_ISDIR(before.st_mode) and member.isdir():
                self._resettle(parts[-1], parent, member, uid, gid)
                self.times.append((parts, mtime))
                return
            if before is not None:
                self._discard(parts[-1], parent, before)
        try:
            self._make(member, tar, parts, parent, uid, gid, mtime)
        except FileExistsError as exc:
            raise ArchiveCorruptError(f"the file-system layer holds {member.name!r} twice") from exc
        if member.isdir():
            self.times.append((parts, mtime))

    def remove(self, name: str) -> None:
        """Take away `name` and all it holds."""
        parts = _parts(name)
        if not parts:
            raise ArchiveCorruptError("the file-system layer's delta removes the layer's top")
        parent = self._open_dir(parts[:-1])
        try:
            self._touch(parts[:-1], parent)
            before = self._existing(parts[-1], parent)
            if before is None:
                raise ArchiveCorruptError(f"the file-system layer's delta removes {name!r}, which its base lacks")
            self._discard(parts[-1], parent, before)
        finally:
            os.close(parent)

    def _touch(self, parts: tuple[str, ...], fd: int) -> None:
        if parts not in self.touched:
            self.touched[parts] = os.fstat(fd).st_mtime_ns

    @staticmethod
    def _existing(leaf: str, parent: int) -> os.stat_result | None:
        try:
            return os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @staticmethod
    def _discard(leaf: str, parent: int, before: os.stat_result) -> None:
        if stat.S_ISDIR(before.st_mode):
            shutil.rmtree(leaf, dir_fd=parent)  # by descriptors, never following a link
        else:
            os.unlink(leaf, dir_fd=parent)

    def _resettle(self, leaf: str, parent: int, member: tarfile.TarInfo, uid: int, gid: int) -> None:
        """A directory that stays: its attributes become the carried ones (those it no longer has go)."""
        fd = os.open(leaf, DIR_FLAGS, dir_fd=parent)
        try:
            self._clear(fd)
            self._settle(fd, member, uid, gid)
        finally:
            os.close(fd)

    @staticmethod
    def _clear(fd: int) -> None:
        """Remove the attributes a layer carries from the directory `fd`: what it should have comes after."""
        for xattr in os.listxattr(fd):
            if xattr in OPAQUE or _users(xattr):
                os.removexattr(fd, xattr)

    def _make(
        self,
        member: tarfile.TarInfo,
        tar: tarfile.TarFile,
        parts: tuple[str, ...],
        parent: int,
        uid: int,
        gid: int,
        mtime: int,
    ) -> None:
        leaf = parts[-1]
        if member.isdir():
            os.mkdir(leaf, 0o700, dir_fd=parent)
            fd = os.open(leaf, DIR_FLAGS, dir_fd=parent)
            try:
                self._settle(fd, member, uid, gid)
            finally:
                os.close(fd)
        elif member.isreg():
            fd = os.open(
                leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
            )
            try:
                self._fill(fd, member, tar)
                self._settle(fd, member, uid, gid)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        elif member.islnk():
            self._link(member, leaf, parent)
        else:
            if member.issym():
                if "\0" in member.linkname or _within(len(parts) - 1, member.linkname) != member.linkname:
                    raise ArchiveCorruptError(
                        f"the file-system layer's link {member.name!r} leads to {member.linkname!r}, out of the layer"
                    )
                os.symlink(member.linkname, leaf, dir_fd=parent)
            elif member.isfifo():
                os.mkfifo(leaf, 0o600, dir_fd=parent)
            elif member.ischr() and member.devmajor == member.devminor == 0:
                os.mknod(leaf, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=parent)
            else:
                raise ArchiveCorruptError(
                    f"the file-system layer's {member.name!r} is a device or an entry of a kind a layer never holds"
                )
            os.chown(leaf, uid, gid, dir_fd=parent, follow_symlinks=False)
            if not member.issym():  # just made here, in a directory reached without links: no link to follow
                os.chmod(leaf, member.mode & 0o7777, dir_fd=parent)
            os.utime(leaf, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)

    def _known(self, key: str, member: tarfile.TarInfo) -> bool:
        if key == PAX_CAPABILITY:
            return member.isreg()
        if key == PAX_USER:
            return member.isreg() or member.isdir()
        return key.removeprefix(PAX_OPAQUE) in OPAQUE and member.isdir()

    @staticmethod
    def _id(carried: int, host: Callable[[int], int | None], member: tarfile.TarInfo) -> int:
        found = host(carried)
        if found is None:
            raise ArchiveCorruptError(
                f"the file-system layer's {member.name!r} is owned by id {carried}, which the container does not map"
            )
        return found

    def _parent(self, parts: tuple[str, ...]) -> int:
        """The directory that holds `parts`, entries being grouped by directory: the last one is kept open."""
        if self.parent is None or self.parent[0] != parts[:-1]:
            fd = self._open_dir(parts[:-1])
            if self.parent is not None:
                os.close(self.parent[1])
            self.parent = (parts[:-1], fd)
        return self.parent[1]

    def _open_dir(self, parts: tuple[str, ...]) -> int:
        fd = os.dup(self.top)
        for depth, part in enumerate(parts):
            try:
                below = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                path = "/".join(parts[: depth + 1])
                raise ArchiveCorruptError(
                    f"the file-system layer's {path!r} is not a directory made before what it holds ({exc.strerror})"
                ) from exc
            finally:
                os.close(fd)
            fd = below
        return fd

    def _fill(self, fd: int, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        """Write the member's data runs to `fd` (a sparse member's holes, and runs of zero bytes, as holes)."""
        # The unbuffered reader under tarfile's: it seeks within the member (past a hole) by moving its position,
        # where the buffered one would ask the stream, which cannot seek, whether it can.
        source = tar.extractfile(member).raw  # type: ignore[union-attr]
        end = 0
        for offset, length in member.sparse if member.sparse is not None else [(0, member.size)]:
            if not end <= offset <= offset + length <= member.size:
                raise ArchiveCorruptError(f"the file-system layer's {member.name!r} has a sparse map out of order")
            end = offset + length
            source.seek(offset)
            os.lseek(fd, offset, os.SEEK_SET)
            while length:
                data = source.read(min(BLOCK, length))
                if not data:
                    raise ArchiveCorruptError(f"the file-system layer's {member.name!r} is cut short")
                if data[:1] == b"\0" and data == bytes(len(data)):  # the first byte tells most data apart
                    os.lseek(fd, len(data), os.SEEK_CUR)
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                length -= len(data)
        os.ftruncate(fd, member.size)
        self.data += member.size

    def _settle(self, fd: int, member: tarfile.TarInfo, uid: int, gid: int) -> None:
        """Owner, then mode (a change of owner clears set-id bits), then attributes (it clears capabilities too)."""
        os.chown(fd, uid, gid)
        os.chmod(fd, member.mode & 0o7777)
        for key, value in member.pax_headers.items():
            if key == PAX_CAPABILITY:
                os.setxattr(fd, filecaps.XATTR, filecaps.restore(value, self.ids))
            elif key.startswith(PAX_OPAQUE):
                if value not in OPAQUE_VALUES:
                    raise ArchiveCorruptError(f"the file-system layer's {member.name!r} carries {key}={value!r}")
                os.setxattr(fd, key.removeprefix(PAX_OPAQUE), value.encode())
            elif key == PAX_USER:
                for name, data in _user_xattrs(value, member).items():
                    os.setxattr(fd, name, data)

    def _link(self, member: tarfile.TarInfo, leaf: str, parent: int) -> None:
        """A second name for a regular file made before: only those are linked (a link to a symbolic link would
        move its relative target to another depth, where it may climb out)."""
        target = _parts(member.linkname)
        source = self._open_dir(target[:-1]) if target else os.dup(self.top)
        try:
            if target and stat.S_ISREG(os.stat(target[-1], dir_fd=source, follow_symlinks=False).st_mode):
                os.link(target[-1], leaf, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
                return
        except FileNotFoundError:
            pass
        finally:
            os.close(source)
        raise ArchiveCorruptError(
            f"the file-system layer's {member.name!r} is a hard link to {member.linkname!r}, no file made before it"
        )

    def finish(self) -> None:
        """Set the directories' times, now that nothing more is made in them: those a delta changed without
        carrying them back to what they were, then the carried ones."""
        for parts, mtime in self.touched.items():
            with contextlib.suppress(ArchiveCorruptError):  # replaced or removed since: a carried entry now
                fd = self._open_dir(parts)
                try:
                    os.utime(fd, ns=(mtime, mtime))
                finally:
                    os.close(fd)
        for parts, mtime in reversed(self.times):
            fd = self._open_dir(parts)
            try:
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)


def _remove(upper: Path, created: bool) -> None:
    """Take away what an unpack that failed made: `upper` itself if it made it, else what it put in it."""
    if created:
        shutil.rmtree(upper, ignore_errors=True)
        return
    with contextlib.suppress(OSError), os.scandir(upper) as listing:
        for entry in listing:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def add(writer: streamer.Sink, upper: Path, confinement: Confinement, base: Index | None = None) -> Index:
    """Write the layer at `upper` as the archive's MEMBER (with `base`, only what changed since, and the names
    gone since as REMOVED); returns its index."""
    _, index = pack(
        upper,
        confinement.id_map,
        lambda data: writer.write(MEMBER, data),
        base,
    )
    writer.end(MEMBER)
    if base is not None:
        writer.write(REMOVED, json.dumps(index.removed_since(base)).encode())
        writer.end(REMOVED)
    return index


def read_removed(path: Path) -> list[str]:
    """A delta's REMOVED member, as unpacked at `path`."""
    try:
        names = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ArchiveCorruptError(f"the file-system layer's list of removed names is unreadable: {exc}") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ArchiveCorruptError("the file-system layer's list of removed names is not a list of names")
    return names
