"""Owns the ssh transport: target addresses, the ssh command line, and framed channels to a remote kerrickpt."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import select
import shlex
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgspec
import xxhash

from kerrickpt import command, fdread, limits, node, schema, testmode
from kerrickpt.errors import (
    KerrickptError,
    MigrationUnknown,
    ProtocolError,
    TransportError,
    UsageError,
    from_dict,
)

CALL_TIMEOUT = 120.0
RELAY_BYTES = 1 << 20
FRAME_HEADER = struct.Struct(">cI")
DATA, END = b"D", b"E"
MAX_FRAME = 8 << 20  # the source sends at most this; a larger length means a broken or hostile stream
PROBE_BYTES = 32 << 20  # what `measure` sends: long enough to see the link's pace, not its start
AES_GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
CIPHERS_TIMEOUT = 10.0
# ssh's own failures (exit 255) that a later attempt may not meet again.
TRANSIENT_SSH = re.compile(
    r"Connection (refused|reset|timed out|closed)|No route to host|Network is unreachable|"
    r"Connection to .* closed|kex_exchange_identification|Broken pipe|Operation timed out"
)


@dataclass(frozen=True)
class Target:
    """A node reached over ssh: [USER@]HOST[:PORT]."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        match = re.fullmatch(
            r"(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:@\s\[\]]+))(?::(?P<port>\d+))?", text
        )
        if not match:
            raise UsageError(f"bad target {text!r}: use [USER@]HOST[:PORT]")
        port = int(match["port"]) if match["port"] else None
        return cls(host=match["v6"] or match["host"], user=match["user"], port=port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}{':' + str(self.port) if self.port else ''}"


@dataclass(frozen=True)
class Link:
    """How to run kerrickpt on a target: ssh options (the user's ssh config still applies) and its path."""

    target: Target
    ssh_options: tuple[str, ...] = ()
    remote_kerrickpt: str = "kerrickpt"
    ssh: str = "ssh"

    def argv(self, remote_args: Sequence[str]) -> list[str]:
        """The ssh command line that runs `kerrickpt REMOTE_ARGS` on the target."""
        return [*self._ssh(), "--", self.target.host, shlex.join([self.remote_kerrickpt, *remote_args])]

    def _ssh(self, *first: str) -> list[str]:
        argv = [self.ssh, *first, "-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if testmode.active():
            # Only a test run's hooks travel, and the target acts on them only in its own test mode.
            argv += ["-o", f"SendEnv={' '.join((testmode.ENV, *testmode.HOOKS))}"]
        for option in self.ssh_options:
            argv += ["-o", option]
        if self.target.port:
            argv += ["-p", str(self.target.port)]
        if self.target.user:
            argv += ["-l", self.target.user]
        return argv

    def with_fast_cipher(self) -> Link:
        """This link with AES-GCM offered first where this CPU has AES instructions and nobody chose
        ssh's ciphers (no Ciphers option, no ssh_config that sets them): ssh's first choice,
        chacha20-poly1305, moves a third less per CPU second on such machines (README: Performance)."""
        if "aes" not in node.cpu_flags() or any(o.lower().startswith("ciphers") for o in self.ssh_options):
            return self
        chosen, default = (self._ciphers(*config) for config in ((), ("-F", "none")))
        if not chosen or chosen != default or not set(AES_GCM) & set(chosen):
            return self
        order = [c for c in AES_GCM if c in chosen] + [c for c in chosen if c not in AES_GCM]
        return dataclasses.replace(self, ssh_options=(*self.ssh_options, "Ciphers=" + ",".join(order)))

    def _ciphers(self, *config: str) -> list[str]:
        """The ciphers ssh would offer the target, as `ssh -G` resolves its configuration; [] if it cannot say."""
        try:
            result = command.run([*self._ssh("-G", *config), "--", self.target.host], timeout=CIPHERS_TIMEOUT)
        except (OSError, KerrickptError):
            return []
        lines = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ciphers ")]
        return lines[0].split(",") if result.returncode == 0 and lines else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": str(self.target),
            "ssh_options": list(self.ssh_options),
            "remote_kerrickpt": self.remote_kerrickpt,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Link:
        return cls(Target.parse(data["target"]), tuple(data["ssh_options"]), data["remote_kerrickpt"])


def ssh_failure(target: Target, returncode: int, stderr: str) -> TransportError:
    """ssh's exit 255 is its own failure; transient ones (refused, reset...) may be retried."""
    transient = bool(TRANSIENT_SSH.search(stderr))
    return TransportError(
        f"ssh to {target} failed (exit {returncode})", log_tail=command.tail(stderr), transient=transient
    )


def call(
    link: Link, remote_args: Sequence[str], request: dict[str, Any], timeout: float = CALL_TIMEOUT
) -> dict[str, Any]:
    """Run one remote kerrickpt command with a JSON request on stdin; returns its JSON answer or raises its error."""
    result = command.run(link.argv(remote_args), timeout=timeout, input_bytes=json.dumps(request).encode())
    if result.returncode == 255:
        raise ssh_failure(link.target, result.returncode, result.stderr)
    answer = _last_event(result.stdout)
    if answer is None or answer.get("event") == "error":
        raise remote_failure(link.target, result.returncode, answer, result.stderr)
    return answer


def call_holding(
    link: Link, remote_args: Sequence[str], request: dict[str, Any], timeout: float = CALL_TIMEOUT
) -> tuple[Channel, dict[str, Any]]:
    """As `call`, for a remote command that reads its request as one frame and lives on after its answer until its
    stdin ends: the channel to it, which the caller closes, and its answer."""
    channel = open_channel(link, remote_args)
    try:
        channel.send(DATA, json.dumps(request).encode())
        answer = channel.answer(timeout, "waiting for its answer")
    except BaseException:
        channel.close()
        raise
    return channel, answer


def open_channel(link: Link, remote_args: Sequence[str]) -> Channel:
    """A Channel to a remote kerrickpt; TransportError if ssh cannot even start (no such program, no memory)."""
    try:
        return Channel(link, remote_args)
    except OSError as exc:
        raise TransportError(f"cannot start ssh to {link.target}: {exc}") from exc


def _last_event(stdout: str) -> dict[str, Any] | None:
    """The remote kerrickpt's answer, None if it said nothing; ProtocolError if it is not a JSON object."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    return _event(lines[-1]) if lines else None


def _event(line: str | bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise ProtocolError(f"the target sent garbage: {line[:200]!r}")
    return event


def remote_failure(target: Target, code: int, event: dict[str, Any] | None, stderr: str) -> KerrickptError:
    """What a remote kerrickpt that failed reported; without a report, its exit code decides."""
    if event is not None and event.get("event") == "error":
        return from_dict(event)
    if code == UsageError.exit_code:
        # Every error but its arguments' it reports: a kerrickpt from before that lacks one this one sends.
        return TransportError(
            f"kerrickpt on {target} refused its arguments (exit {code}): update kerrickpt there",
            log_tail=command.tail(stderr),
        )
    # 126/127: the remote kerrickpt cannot be run at all, and will not be on the next try either.
    transient = code not in (126, 127)
    return TransportError(
        f"kerrickpt on {target} failed (exit {code}) without an answer",
        log_tail=command.tail(stderr),
        transient=transient,
    )


class Channel:
    """A running remote kerrickpt: framed bytes go to its stdin, JSON events come from its stdout."""

    def __init__(self, link: Link, remote_args: Sequence[str]) -> None:
        self.link = link
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the channel; closed in close()
        self.proc = subprocess.Popen(
            link.argv(remote_args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: BinaryIO = self.proc.stdin
        self.stdout: BinaryIO = self.proc.stdout
        # Written around Python's buffer, without blocking: a target that stops reading must not
        # hold a frozen container for ever (see send).
        os.set_blocking(self.stdin.fileno(), False)
        self.pending = b""
        self.connected = False  # the remote side answered: ssh reached it

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for stream in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()

    def error_tail(self) -> str:
        return command.tail_of(self.stderr)

    def broken(self, what: str) -> KerrickptError:
        """The connection failed: ssh's reason, or what the remote kerrickpt said before it went."""
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = -1
        tail = self.error_tail()
        if code == 255:
            failure = ssh_failure(self.link.target, code, tail)
            failure.message = f"{failure.message} while {what}"
            # Once the remote side has answered, ssh's 255 is the link or that side's process
            # (killed, its host rebooted) going away mid-way: a new connection may well work.
            failure.transient = failure.transient or self.connected
            return failure
        if code == -1:
            return TransportError(
                f"the connection to {self.link.target} broke while {what}", log_tail=tail, transient=True
            )
        try:
            said = self.event(timeout=1)
        except KerrickptError:
            said = None
        return remote_failure(self.link.target, code, said, tail)

    def send(self, kind: bytes, payload: bytes | memoryview = b"") -> None:
        """One frame; raises TransportError if the link breaks or the other side takes nothing for
        limits.SEND_STALL."""
        try:
            for piece in (FRAME_HEADER.pack(kind, len(payload)), payload):
                self._write(memoryview(piece))
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise self.broken("sending") from exc

    def _write(self, data: memoryview) -> None:
        stall = limits.SEND_STALL.seconds()
        if not _write_all(self.stdin.fileno(), data, stall):
            self.proc.kill()
            raise TransportError(f"{self.link.target} took nothing for {stall:g} s", transient=True)

    def answer(self, timeout: float, what: str) -> dict[str, Any]:
        """The remote side's next event, `what` it is waited for; raises the error it reports, or why none came."""
        event = self.event(timeout)
        if event is None:
            raise self.broken(what)
        self.connected = True
        if event.get("event") == "error":
            raise from_dict(event)
        return event

    def ready(self) -> None:
        """Wait for the remote side's "ready": it has checked what it could before a byte comes."""
        event = self.answer(CALL_TIMEOUT, "waiting for the target to be ready")
        if event.get("event") == "restored":  # it arrived there before: never a reason to resume the source
            raise MigrationUnknown(f"{self.link.target} has this migration already; `kerrickpt recover` finishes it")
        if event.get("event") != "ready":
            raise ProtocolError(f"{self.link.target} answered {event.get('event')!r} instead of being ready")

    def event(self, timeout: float) -> dict[str, Any] | None:
        """The next JSON event from the remote side, or None if it closed without one."""
        deadline = time.monotonic() + timeout
        fd = self.stdout.fileno()
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not fdread.ready(fd, select.POLLIN, left):
                raise TransportError(f"{self.link.target} did not answer within {timeout:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return _event(line)


class _Tally:
    """The size and digest of a stream's DATA bytes: what its END frame carries, and what the reader checks."""

    def __init__(self) -> None:
        self.hash = xxhash.xxh3_128()
        self.bytes = 0

    def add(self, data: bytes | memoryview) -> None:
        self.hash.update(data)
        self.bytes += len(data)

    def record(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "xxh3_128": self.hash.hexdigest()}


class Sender:
    """One archive's DATA frames through a channel, with the size and digest its END frame carries."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.tally = _Tally()

    def send(self, data: bytes | memoryview) -> None:
        for start in range(0, len(data), MAX_FRAME):
            piece = data[start : start + MAX_FRAME]
            self.channel.send(DATA, piece)
            self.tally.add(piece)

    def end(self) -> None:
        """After this the target may act on what it received."""
        self.channel.send(END, json.dumps(self.tally.record()).encode())


class FrameReader(io.RawIOBase):
    """The remote side's stdin as the byte stream a Sender sent; raises TransportError if the stream
    is torn or its END frame does not match what arrived, so nothing incomplete reads as whole."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.tally = _Tally()
        self.buffer = memoryview(b"")
        self.ended = False
        self.first_data: float | None = None  # when the first DATA frame came (a link's speed is from then)
        self.stall = limits.RECEIVE_STALL.seconds()

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self.buffer:
            if self.ended:
                return 0
            frame = read_frame(self.stream, self.stall)
            if frame is None:
                raise TransportError("the source went away before the end of the archive", transient=True)
            kind, payload = frame
            if kind == END:
                end = schema.from_peer(payload, schema.End, "the source")
                if msgspec.structs.asdict(end) != self.tally.record():
                    raise TransportError("the archive arrived damaged (size or digest differ)", transient=True)
                self.ended = True
                continue
            if kind != DATA:
                raise ProtocolError(f"unexpected frame {kind!r} from the source")
            if self.first_data is None:
                self.first_data = time.monotonic()
            self.tally.add(payload)
            self.buffer = memoryview(payload)
        size = min(len(target), len(self.buffer))
        target[:size] = self.buffer[:size]
        self.buffer = self.buffer[size:]
        return size


def measure(link: Link, size: int = PROBE_BYTES) -> float:
    """The link's speed in MiB/s through ssh, as the target saw `size` random bytes arrive."""
    block = os.urandom(1 << 20)  # random: an ssh that compresses must not make the link look faster
    with Channel(link, ["agent", "sink"]) as channel:
        sender = Sender(channel)
        for _ in range(size // len(block)):
            sender.send(block)
        sender.end()
        answer = channel.event(CALL_TIMEOUT)
    if answer is None or answer.get("event") == "error":
        raise remote_failure(link.target, channel.proc.returncode or 0, answer, channel.error_tail())
    sunk = schema.from_peer(answer, schema.Sunk, str(link.target))
    return sunk.bytes / max(sunk.seconds, 1e-6) / (1 << 20)


def sink(stream: BinaryIO) -> dict[str, float]:
    """The remote end of `measure`: read a Sender's stream to its end; how many bytes, in how long."""
    reader = FrameReader(stream)
    while reader.read(1 << 20):
        pass
    return {"bytes": reader.tally.bytes, "seconds": time.monotonic() - (reader.first_data or time.monotonic())}


def read_frame(stream: BinaryIO, stall: float | None = None) -> tuple[bytes, bytes | bytearray] | None:
    """One frame from a channel's stdin on the remote side; None at a clean or torn end.

    A source that sends nothing for `stall` seconds (limits.RECEIVE_STALL by default) is given up
    (TransportError): a link that died without closing must not keep this side, and its
    `in-progress` mark, for ever.
    """
    stall = limits.RECEIVE_STALL.seconds() if stall is None else stall
    header = _read_exact(stream, FRAME_HEADER.size, stall)
    if len(header) < FRAME_HEADER.size:
        return None
    kind, size = FRAME_HEADER.unpack(header)
    if size > MAX_FRAME:
        raise TransportError(f"a frame of {size} bytes: the stream is broken")
    payload = _read_exact(stream, size, stall)
    if len(payload) < size:
        return None
    return kind, payload


def _read_exact(stream: BinaryIO, size: int, stall: float) -> bytes | bytearray:
    """`size` bytes (fewer only where the stream ends), read from the fd itself when there is one."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both: a stream in memory cannot stall
        return stream.read(size)
    try:
        return fdread.read_exact(fd, size, stall)
    except fdread.Stalled:
        raise TransportError(f"the source sent nothing for {stall:g} s", transient=True) from None


def _write_all(fd: int, data: memoryview, stall: float) -> bool:
    """Write all of `data` to `fd` (blocking or not); False if it took nothing for `stall` s."""
    while data:
        if not fdread.ready(fd, select.POLLOUT, stall):
            return False
        try:
            data = data[os.write(fd, data) :]
        except BlockingIOError:
            continue
    return True


class Relay:
    """Carries bytes both ways between a connected socket and a pair of pipes (an ssh channel's, or
    this process's stdin and stdout): CRIU's page server and lazy-pages daemon talk through it.

    `done` is set when the socket's side has ended (its peer closed): the transfer is over. The
    stall limits (limits.SEND_STALL, limits.RECEIVE_STALL) are read once, here, so that a bad
    setting fails the start and never a thread or a failure path.
    """

    def __init__(self, sock: socket.socket, read_fd: int, write_fd: int) -> None:
        self.sock = sock
        self.send_stall, self.receive_stall = limits.SEND_STALL.seconds(), limits.RECEIVE_STALL.seconds()
        self.done = threading.Event()
        self.moved = 0  # bytes either way: what `wait` watches for progress
        self.threads = [
            threading.Thread(target=self._to_socket, args=(read_fd,), daemon=True),
            threading.Thread(target=self._from_socket, args=(write_fd,), daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _to_socket(self, read_fd: int) -> None:
        with contextlib.suppress(OSError):
            while fdread.ready(read_fd, select.POLLIN, self.receive_stall) and (data := os.read(read_fd, RELAY_BYTES)):
                self.sock.sendall(data)
                self.moved += len(data)
            self.sock.shutdown(socket.SHUT_WR)

    def _from_socket(self, write_fd: int) -> None:
        try:
            while data := self.sock.recv(RELAY_BYTES):
                if not _write_all(write_fd, memoryview(data), self.send_stall):
                    break
                self.moved += len(data)
        except OSError:
            pass
        finally:
            self.done.set()

    def wait(self, patient_first: bool = False) -> bool:
        """Until the transfer is over (True) or nothing moved for the send stall limit (False); before
        the first byte, for the receive stall limit with `patient_first`."""
        last, since = self.moved, time.monotonic()
        while not self.done.wait(1.0):
            if self.moved != last:
                last, since = self.moved, time.monotonic()
            elif time.monotonic() - since > (
                self.receive_stall if patient_first and not self.moved else self.send_stall
            ):
                return False
        return True

    def cut(self) -> None:
        """End the socket's side: its peer sees the end, and the thread that writes it stops."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def join(self, toward_pipe: bool = False) -> None:
        """Wait for the threads (only the one writing to the pipe, with `toward_pipe`) to finish:
        cut first, and end the pipes' other side, or this waits for their stall limits."""
        for thread in self.threads[1:] if toward_pipe else self.threads:
            thread.join(timeout=self.receive_stall)


def emit(stream: Any, event: str, **data: Any) -> None:
    """Write one JSON event line to the source (the remote side's stdout)."""
    try:
        stream.write(json.dumps({"event": event, **data}) + "\n")
        stream.flush()
    except (BrokenPipeError, OSError):
        pass  # the source is gone; what happened is found again by `recover`
