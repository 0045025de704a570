"""The ssh transport's pure parts: target parsing, the ssh command line, failure classification, frames."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from kerrickpt import node, transport, zstdframe
from kerrickpt.errors import BusyError, MigrationUnknown, TransportError, UsageError
from kerrickpt.transport import Link, Target


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("node7", Target("node7")),
        ("root@node7:2222", Target("node7", "root", 2222)),
        ("ops@198.18.0.2", Target("198.18.0.2", "ops")),
        ("[2001:db8::1]:22", Target("2001:db8::1", None, 22)),
    ],
)
def test_parse_target(text: str, target: Target) -> None:
    assert Target.parse(text) == target
    assert str(target) == text


@pytest.mark.parametrize("bad", ["", "a b", "user@", "host:port", "@host"])
def test_bad_targets_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        Target.parse(bad)


def test_ssh_argv_quotes_the_remote_command() -> None:
    link = Link(Target("node7", "root", 2222), ("IdentityFile=/k ey",), "/opt/kerrickpt/bin/kerrickpt")
    assert link.argv(["agent", "receive", "--name", "job 1"]) == [
        "ssh", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
        "-o", "SendEnv=KERRICKPT_TEST_MODE KERRICKPT_FAULT KERRICKPT_TEST_FINGERPRINT",
        "-o", "IdentityFile=/k ey", "-p", "2222", "-l", "root",
        "--", "node7", "/opt/kerrickpt/bin/kerrickpt agent receive --name 'job 1'",
    ]  # fmt: skip
    assert Link.from_dict(link.to_dict()) == link


needs_aes_and_ssh = pytest.mark.skipif(
    "aes" not in node.cpu_flags() or shutil.which("ssh") is None, reason="needs ssh and a CPU with AES instructions"
)


@needs_aes_and_ssh
def test_aes_gcm_is_offered_first_where_nobody_chose_the_ciphers() -> None:
    link = Link(Target("node7"), ("IdentityFile=/k",)).with_fast_cipher()

    (ciphers,) = [o for o in link.ssh_options if o.startswith("Ciphers=")]
    offered = ciphers.removeprefix("Ciphers=").split(",")
    assert offered[0] == "aes128-gcm@openssh.com"
    assert set(offered) == set(Link(Target("node7"))._ciphers()), "the same ciphers, only in another order"
    assert link.argv(["ps"])[-3:] == ["--", "node7", "kerrickpt ps"]


@needs_aes_and_ssh
def test_ciphers_someone_chose_are_left_alone(tmp_path: Path) -> None:
    chosen = Link(Target("node7"), ("Ciphers=aes256-ctr",))
    assert chosen.with_fast_cipher() == chosen
    # An ssh_config that sets them: a wrapper reads one, as ~/.ssh/config would be, unless told `-F none`.
    config = tmp_path / "config"
    config.write_text("Ciphers chacha20-poly1305@openssh.com,aes256-gcm@openssh.com\n")
    wrapper = tmp_path / "ssh"
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *"-F none"*) exec ssh "$@";; esac\nexec ssh -F {config} "$@"\n')
    wrapper.chmod(0o755)
    configured = Link(Target("node7"), ssh=str(wrapper))
    assert configured._ciphers() == ["chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com"]
    assert configured.with_fast_cipher() == configured


@pytest.mark.parametrize(
    ("stderr", "transient"),
    [
        ("ssh: connect to host 198.18.0.2 port 22: Connection refused", True),
        ("Connection reset by peer", True),
        ("ssh: connect to host x port 22: No route to host", True),
        ("root@198.18.0.2: Permission denied (publickey).", False),
        ("Host key verification failed.", False),
    ],
)
def test_ssh_failures_are_classified(stderr: str, transient: bool) -> None:
    failure = transport.ssh_failure(Target("x"), 255, stderr)
    assert failure.transient is transient and failure.exit_code == 11


def test_frames_round_trip_and_torn_frames_end() -> None:
    wire = transport.FRAME_HEADER.pack(transport.DATA, 3) + b"abc" + transport.FRAME_HEADER.pack(transport.END, 2)
    stream = io.BytesIO(wire + b"{}")
    assert transport.read_frame(stream) == (transport.DATA, b"abc")
    assert transport.read_frame(stream) == (transport.END, b"{}")
    assert transport.read_frame(stream) is None
    assert transport.read_frame(io.BytesIO(wire[:-1])) == (transport.DATA, b"abc")
    torn = io.BytesIO(wire[: transport.FRAME_HEADER.size + 1])
    assert transport.read_frame(torn) is None


class _Wire:
    """A channel whose frames land in a buffer, to read back as the remote side would."""

    def __init__(self) -> None:
        self.stdin = io.BytesIO()

    def send(self, kind: bytes, payload: bytes | memoryview = b"") -> None:
        self.stdin.write(transport.FRAME_HEADER.pack(kind, len(payload)) + bytes(payload))


def _sent(*pieces: bytes, end: bool = True) -> bytes:
    wire = _Wire()
    sender = transport.Sender(wire)  # type: ignore[arg-type]
    for piece in pieces:
        sender.send(piece)
    if end:
        sender.end()
    return wire.stdin.getvalue()


def test_a_stream_reads_back_whole_only_with_its_end_frame() -> None:
    big = bytes(range(256)) * (transport.MAX_FRAME // 128)  # two frames' worth: cut to MAX_FRAME
    wire = _sent(b"head", big)
    assert transport.FrameReader(io.BytesIO(wire)).read() == b"head" + big
    with pytest.raises(TransportError, match="went away"):
        transport.FrameReader(io.BytesIO(_sent(b"head", big, end=False))).read()


def test_a_stream_whose_end_frame_disagrees_is_refused() -> None:
    wire = bytearray(_sent(b"payload"))
    wire[transport.FRAME_HEADER.size] ^= 1  # a flipped byte in the data
    with pytest.raises(TransportError, match="damaged"):
        transport.FrameReader(io.BytesIO(bytes(wire))).read()


@pytest.mark.parametrize(("mib_s", "level"), [(5000.0, -3), (400.0, -2), (150.0, 1), (20.0, 3)])
def test_the_level_follows_the_link(mib_s: float, level: int) -> None:
    assert zstdframe.level_for_link(mib_s) == level


def test_a_source_that_goes_silent_is_given_up() -> None:
    read, write = os.pipe()
    try:
        with os.fdopen(read, "rb") as stream, pytest.raises(TransportError, match="sent nothing"):
            transport.read_frame(stream, stall=0.1)
    finally:
        os.close(write)


@pytest.mark.parametrize(
    ("answer", "raised"),
    [
        ('{"event": "ready"}', None),
        ('{"event": "restored", "name": "x", "pid_map": {}}', MigrationUnknown),
        ('{"event": "error", "error": "BusyError", "message": "being received"}', BusyError),
    ],
)
def test_a_receiver_that_has_the_migration_already_is_never_a_reason_to_resume(
    tmp_path: Path, answer: str, raised: type[Exception] | None
) -> None:
    fake_ssh = tmp_path / "ssh"  # stands in for ssh and the remote kerrickpt: it answers, then waits
    fake_ssh.write_text(f"#!/bin/sh\necho '{answer}'\nexec cat > /dev/null\n")
    fake_ssh.chmod(0o755)
    with transport.Channel(Link(Target("node"), ssh=str(fake_ssh)), ["agent", "receive"]) as channel:
        if raised is None:
            channel.ready()
        else:
            with pytest.raises(raised):
                channel.ready()


def test_a_remote_kerrickpt_that_refuses_its_arguments_says_to_update_it_and_is_not_retried() -> None:
    stderr = "kerrickpt: error (exit 2): kerrickpt agent: unrecognized arguments: --hold\n"

    failure = transport.remote_failure(Target.parse("node-b"), 2, None, stderr)

    assert isinstance(failure, TransportError) and not failure.transient
    assert failure.message == "kerrickpt on node-b refused its arguments (exit 2): update kerrickpt there"
    assert "unrecognized arguments: --hold" in failure.log_tail
