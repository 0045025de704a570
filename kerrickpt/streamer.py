"""Owns CRIU's image-streaming protocol: the capture and serve sockets, their framed messages, and each image's pipe."""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from kerrickpt.errors import KerrickptError

SOCKET = "streamer-capture.sock"
SERVE_SOCKET = "streamer-serve.sock"
READ_BYTES = 1 << 20
# CRIU splices pages into each pipe: a bigger pipe means fewer wake-ups on both sides.
PIPE_BYTES = 1 << 20
_LENGTH = struct.Struct("<I")  # CRIU frames every protobuf with its u32 little-endian length
MAX_REQUEST = 4096


class StreamError(KerrickptError):
    """CRIU's image stream broke the protocol."""


class Sink(Protocol):
    """Takes image files piece by piece, several at once, in the order CRIU writes them."""

    def write(self, name: str, data: bytes) -> None: ...

    def end(self, name: str) -> None: ...


@runtime_checkable
class PipeSink(Sink, Protocol):
    """A Sink that moves an image's bytes from CRIU's pipe itself (splice): they never pass through Python."""

    def take(self, name: str, pipe: int, most: int) -> int:
        """Move up to `most` bytes of image `name` from the readable `pipe`; how many (0: the pipe has ended)."""
        ...


def filename(message: bytes) -> str:
    """The file name in an img_streamer_request_entry (`required string filename = 1`).

    Decoded by hand, not with pycriu's compiled message: importing pycriu takes ~45 ms, a
    tenth of a small container's checkpoint or restore. Field 1, wire type 2
    (length-delimited): tag byte 0x0a, a varint length, the UTF-8 name.
    """
    length, shift, at, ended = 0, 0, 1, False
    while not ended and at < len(message):
        byte = message[at]
        length |= (byte & 0x7F) << shift
        shift, at, ended = shift + 7, at + 1, not byte & 0x80
    if message[:1] != b"\x0a" or not ended or at + length != len(message):
        raise StreamError(f"unexpected image stream request {message!r}")
    try:
        return message[at:].decode()
    except UnicodeDecodeError as exc:
        raise StreamError(f"unexpected image stream request {message!r}") from exc


class _Listener:
    """A unix socket in an images directory for one CRIU, removed when the block ends.

    The socket's authentication is where it lives: the images directory is 0700 and
    root's, so only root can reach the socket; on top, each subclass checks its peer.
    """

    name = SOCKET

    def __init__(self, images_dir: Path) -> None:
        self.dir_fd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            mode = os.fstat(self.dir_fd).st_mode
            if stat.S_IMODE(mode) & 0o077:
                raise StreamError(f"{images_dir} is open to others; the streamer socket must live in a 0700 directory")
            # Bound through the directory's fd: a deep state directory would overflow sun_path's 108 bytes.
            self.listener.bind(f"/proc/self/fd/{self.dir_fd}/{self.name}")
            self.listener.listen(1)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.listener.close()
        if self.dir_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=self.dir_fd)
            os.close(self.dir_fd)
            self.dir_fd = -1

    def _accept(self, allowed: Callable[[int], bool], who: str) -> socket.socket:
        connection, _ = self.listener.accept()
        creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer = struct.unpack("3i", creds)[0]
        if not allowed(peer):
            connection.close()
            raise StreamError(f"process {peer}, not {who}, connected to the image streamer")
        return connection


class Capture(_Listener):
    """Listens at `<images dir>/streamer-capture.sock` for one CRIU dump and takes its images.

    The peer must be the CRIU process kerrickpt started.
    """

    def serve(self, pid: int, sink: Sink, idle: float) -> None:
        """Pass CRIU's (process `pid`) images to `sink` until it has closed them all, or has exited.

        Every open image's pipe is drained as data comes (CRIU writes several at once and
        would deadlock waiting on one we do not read). If this raises, the socket and all
        pipes are closed: CRIU's next write fails with EPIPE, and it gives up its dump cleanly.
        Raises TimeoutError when nothing has arrived for `idle` seconds: a big container
        may stream for long, but never in silence.
        """
        selector = selectors.DefaultSelector()
        exited = os.pidfd_open(pid)
        selector.register(exited, selectors.EVENT_READ)
        selector.register(self.listener, selectors.EVENT_READ)
        connection: socket.socket | None = None
        pipes: dict[int, str] = {}
        accepted = gone = False
        # Decided once: a runtime_checkable Protocol's isinstance is slow, and each read is in the freeze window.
        pipe_sink = sink if isinstance(sink, PipeSink) else None
        last_heard = time.monotonic()
        try:
            while (not accepted and not gone) or connection is not None or pipes:
                remaining = idle - (time.monotonic() - last_heard)
                if remaining <= 0:
                    raise TimeoutError("CRIU's image stream did not end in time")
                for key, _ in selector.select(remaining):
                    if key.fileobj == exited:
                        gone = True
                        selector.unregister(exited)
                    elif key.fileobj is self.listener:
                        connection = self._accept(lambda peer: peer == pid, f"CRIU ({pid})")
                        accepted = True
                        selector.unregister(self.listener)
                        selector.register(connection, selectors.EVENT_READ)
                    elif key.fileobj is connection:
                        request = _receive(connection)
                        if request is None:  # CRIU opens no more images; open pipes go on
                            selector.unregister(connection)
                            connection.close()
                            connection = None
                            continue
                        name, fd = request
                        pipes[fd] = name
                        selector.register(fd, selectors.EVENT_READ)
                    else:
                        fd = key.fd
                        if pipe_sink is not None:
                            moved = pipe_sink.take(pipes[fd], fd, READ_BYTES)
                        else:
                            data = os.read(fd, READ_BYTES)
                            moved = len(data)
                            if moved:
                                sink.write(pipes[fd], data)
                        last_heard = time.monotonic()
                        if moved:
                            continue
                        selector.unregister(fd)
                        os.close(fd)
                        sink.end(pipes.pop(fd))
        finally:
            # One dump per socket: a CRIU that connected late must not wait on a queue nobody reads.
            self.listener.close()
            for fd in pipes:
                os.close(fd)
            if connection is not None:
                connection.close()
            os.close(exited)
            selector.close()


class Serve(_Listener):
    """Listens at `<images dir>/streamer-serve.sock` for one CRIU restore, which asks it for images.

    The peer must pass `allowed` (a process of the container being restored). CRIU asks for
    one image at a time and waits for the answer: `request`, then `answer`, which for an
    image that exists returns the write end of the pipe CRIU reads it from.
    """

    name = SERVE_SOCKET

    def accept(self, allowed: Callable[[int], bool]) -> socket.socket:
        return self._accept(allowed, "the restoring CRIU")

    @staticmethod
    def request(connection: socket.socket) -> str | None:
        """The name of the image CRIU asks for; None once it hung up (it opens no more)."""
        return _request(connection)

    @staticmethod
    def answer(connection: socket.socket, name: str, exists: bool) -> int | None:
        """Tell CRIU whether `name` exists (no reads as ENOENT); if it does, the pipe to write it into."""
        # img_streamer_reply_entry: `required bool exists = 1`, field 1 as a varint: 0x08, then 0 or 1.
        connection.sendall(_LENGTH.pack(2) + bytes((0x08, int(exists))))
        return _pipe(connection, name) if exists else None


def _request(connection: socket.socket) -> str | None:
    """The file name of one image request; None once CRIU hung up."""
    header = _exactly(connection, _LENGTH.size, eof_ok=True)
    if not header:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_REQUEST:
        raise StreamError(f"image stream request of {length} bytes")
    return filename(_exactly(connection, length, eof_ok=False))


def _receive(connection: socket.socket) -> tuple[str, int] | None:
    """One image request of a dump: its file name and the read end of its pipe; None once CRIU hung up."""
    name = _request(connection)
    return None if name is None else (name, _pipe(connection, name))


def _pipe(connection: socket.socket, name: str) -> int:
    """The end of the pipe CRIU sends for image `name`."""
    # The pipe comes with a 1-byte payload; reading exactly that byte keeps the next request intact.
    _, fds, flags, _ = socket.recv_fds(connection, 1, 1)
    if not fds or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise StreamError(f"CRIU sent no pipe for {name}")
    # A program started meanwhile must not keep CRIU's pipe open: closing it is how CRIU is cut off.
    os.set_inheritable(fds[0], False)
    # Refused above fs.pipe-max-size without CAP_SYS_RESOURCE: the default pipe works, only slower.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fds[0], fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return fds[0]


def _exactly(connection: socket.socket, size: int, *, eof_ok: bool) -> bytes:
    data = b""
    while len(data) < size:
        more = connection.recv(size - len(data))
        if not more:
            if eof_ok and not data:
                return b""
            raise StreamError("CRIU's image stream ended in the middle of a request")
        data += more
    return data
