"""The image streamer against a stand-in for CRIU that speaks its protocol: names, pipes, several files at once."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from pycriu.images.img_streamer_pb2 import img_streamer_request_entry

from kerrickpt import streamer

# Opens images as CRIU does (a framed request, then the pipe's read end with a 1-byte payload) and
# writes 2 MiB into the second before touching the first again: a streamer that read one file to
# its end before the next would leave it blocked for ever.
FAKE_CRIU = textwrap.dedent(
    """
    import os, socket, struct
    sock = socket.socket(socket.AF_UNIX)
    sock.connect("streamer-capture.sock")

    def open_image(name):
        raw = name.encode()
        message = bytes([0x0A, len(raw)]) + raw
        sock.sendall(struct.pack("<I", len(message)) + message)
        read, write = os.pipe()
        socket.send_fds(sock, [b"\\0"], [read])
        os.close(read)
        return write

    pages = open_image("pages-1.img")
    pagemap = open_image("pagemap-1.img")
    os.write(pages, b"p" * 1000)
    os.write(pagemap, b"m" * (2 << 20))
    os.write(pages, b"q")
    os.close(pagemap)
    os.close(pages)
    core = open_image("core-1.img")
    sock.close()  # no more images; the open one goes on
    os.write(core, b"core")
    os.close(core)
    """
)


class Collected:
    """A Sink that keeps what it is given."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ended: list[str] = []
        self.criu_exit: int | None = None

    def write(self, name: str, data: bytes) -> None:
        assert name not in self.ended
        self.files[name] = self.files.get(name, b"") + data

    def end(self, name: str) -> None:
        self.ended.append(name)


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "images"
    path.mkdir(mode=0o700)
    yield path
    assert list(path.iterdir()) == [], "the socket is removed"


def run(images: Path, script: str, idle: float = 30.0, sink: Collected | None = None) -> Collected:
    sink = sink or Collected()
    with streamer.Capture(images) as capture:
        process = subprocess.Popen([sys.executable, "-c", script], cwd=images)
        try:
            capture.serve(process.pid, sink, idle)
        finally:
            sink.criu_exit = process.wait(timeout=10)
    return sink


def test_every_image_arrives_whole_with_several_open_at_once(images: Path) -> None:
    sink = run(images, FAKE_CRIU)
    assert sink.files == {"pages-1.img": b"p" * 1000 + b"q", "pagemap-1.img": b"m" * (2 << 20), "core-1.img": b"core"}
    assert sink.ended == ["pagemap-1.img", "pages-1.img", "core-1.img"]


class Failing(Collected):
    def write(self, name: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")


def test_a_failing_sink_makes_criu_give_up(images: Path) -> None:
    sink = Failing()
    script = "try:\n" + textwrap.indent(FAKE_CRIU, "    ") + "\nexcept BrokenPipeError:\n    raise SystemExit(3)\n"
    with pytest.raises(OSError, match="No space"):
        run(images, script, sink=sink)
    assert sink.criu_exit == 3, "its next write found the pipe closed"


def test_a_criu_that_exits_before_connecting_ends_the_stream(images: Path) -> None:
    assert run(images, "raise SystemExit(1)").files == {}


def test_a_stream_silent_for_too_long_times_out(images: Path) -> None:
    with pytest.raises(TimeoutError):
        run(images, "import time; time.sleep(2)", idle=0.5)


def test_only_the_criu_it_started_may_connect(images: Path) -> None:
    sink = Collected()
    with streamer.Capture(images) as capture, socket.socket(socket.AF_UNIX) as intruder:
        intruder.connect(str(images / streamer.SOCKET))
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            with pytest.raises(streamer.StreamError, match="not CRIU"):
                capture.serve(process.pid, sink, 10)
        finally:
            process.kill()
            process.wait()


def test_the_socket_lives_only_in_a_private_directory(images: Path) -> None:
    images.chmod(0o755)
    with pytest.raises(streamer.StreamError, match="0700"):
        streamer.Capture(images)


@pytest.mark.parametrize("name", ["pages-1.img", "x" * 300])
def test_requests_decode_by_hand_as_pycriu_encodes_them(name: str) -> None:
    message = img_streamer_request_entry(filename=name).SerializeToString()
    assert streamer.filename(message) == name
    for broken in (message[:-1], message + b"x", b"\x12" + message[1:], message[:2], b"\x0a\x80", b"\x0a\x01\xff"):
        with pytest.raises(streamer.StreamError):
            streamer.filename(broken)
