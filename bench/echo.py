"""The netmigrate case's server and clients, each one process of one thread (selectors), however many connections.

`serve PORT MIB` holds MIB MiB of random bytes, prints memload's `ready mib=MIB kind=random sum=HEX` (and its
`verify OK|BAD sum=HEX` on SIGUSR1, see memload.c), and answers each line N of a connection with `N SEEN` (SEEN:
the lines that connection brought so far). `talk ADDR PORT COUNT STOPFILE REPORT` opens COUNT connections, prints
`connected COUNT`, then sends 1, 2, ... on each, one request every PERIOD seconds once the previous one was answered,
and checks every answer (none lost, none twice, in order); once STOPFILE exists and every connection has had AFTER
more answers, it writes REPORT (JSON: each connection's answers and longest gap between two, the first error) and
exits, 1 if any answer was wrong or a connection was lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PERIOD = 0.1
AFTER = 3  # answers each connection must get once asked to stop: it came through whatever happened before
CONNECT_TIMEOUT = 30.0


def serve(port: int, mib: int) -> None:
    ballast = bytearray(os.urandom(mib << 20))
    expected = hashlib.sha256(ballast).hexdigest()

    def verify(_signum: int, _frame: object) -> None:
        digest = hashlib.sha256(ballast).hexdigest()
        print(f"verify {'OK' if digest == expected else 'BAD'} sum={digest}", flush=True)

    signal.signal(signal.SIGUSR1, verify)
    listener = socket.create_server(("0.0.0.0", port), backlog=1024)
    listener.setblocking(False)
    picker = selectors.DefaultSelector()
    picker.register(listener, selectors.EVENT_READ)
    pending: dict[socket.socket, bytes] = {}
    seen: dict[socket.socket, int] = {}
    print(f"ready mib={mib} kind=random sum={expected}", flush=True)
    while True:
        for key, _events in picker.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                peer, _ = listener.accept()
                peer.setblocking(False)
                picker.register(peer, selectors.EVENT_READ)
                pending[peer], seen[peer] = b"", 0
                continue
            data = sock.recv(65536)
            if not data:
                picker.unregister(sock)
                sock.close()
                del pending[sock], seen[sock]
                continue
            *lines, pending[sock] = (pending[sock] + data).split(b"\n")
            answers = []
            for line in lines:
                seen[sock] += 1
                answers.append(b"%d %d\n" % (int(line), seen[sock]))
            sock.sendall(b"".join(answers))  # a few bytes: the socket's buffer takes them


@dataclass
class Peer:
    """One client connection: what it sent, what came back, and the longest wait between two answers."""

    sock: socket.socket
    sent: int = 0
    answered: int = 0
    buffer: bytes = b""
    last_answer: float = field(default_factory=time.monotonic)
    next_send: float = 0.0
    longest_gap_s: float = 0.0
    stop_mark: int | None = None  # its answers when it was asked to stop


def talk(address: str, port: int, count: int, stop: Path, report: Path) -> int:
    peers = [Peer(connect(address, port)) for _ in range(count)]
    print(f"connected {count}", flush=True)
    picker = selectors.DefaultSelector()
    start = time.monotonic()
    for n, peer in enumerate(peers):
        peer.sock.setblocking(False)
        peer.last_answer = start
        peer.next_send = start + PERIOD * n / count  # spread over a period, as independent clients would be
        picker.register(peer.sock, selectors.EVENT_READ, peer)
    error = ""
    while not error:
        now = time.monotonic()
        if stop.exists():
            for peer in peers:
                peer.stop_mark = peer.answered if peer.stop_mark is None else peer.stop_mark
            if all(p.stop_mark is not None and p.answered >= p.stop_mark + AFTER for p in peers):
                break
        for peer in peers:
            if peer.sent == peer.answered and now >= peer.next_send:
                peer.sent += 1
                peer.sock.send(b"%d\n" % peer.sent)
        wake = min((p.next_send for p in peers if p.sent == p.answered), default=now + PERIOD)
        for key, _events in picker.select(max(0.0, wake - time.monotonic())):
            error = _receive(key.data, time.monotonic())
            if error:
                break
    json.dump(
        {
            "connections": count,
            "answers": [p.answered for p in peers],
            "longest_gap_s": [round(p.longest_gap_s, 4) for p in peers],
            "error": error,
        },
        report.open("w"),
    )
    return 1 if error else 0


def connect(address: str, port: int) -> socket.socket:
    """A connection to `address`:`port`, tried again until the server listens (CONNECT_TIMEOUT at most)."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            return socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _receive(peer: Peer, now: float) -> str:
    """Take what came on `peer`'s connection; what was wrong with it, or "" if nothing."""
    try:
        data = peer.sock.recv(4096)
    except OSError as exc:
        return f"connection {peer.sock.getsockname()}: {exc}"
    if not data:
        return f"connection {peer.sock.getsockname()} closed by the server after {peer.answered} answers"
    *lines, peer.buffer = (peer.buffer + data).split(b"\n")
    for line in lines:
        expected = peer.answered + 1
        if line.split() != [b"%d" % expected, b"%d" % expected] or expected > peer.sent:
            return f"connection {peer.sock.getsockname()}: answer {line!r}, expected {expected} {expected}"
        peer.answered = expected
        peer.longest_gap_s = max(peer.longest_gap_s, now - peer.last_answer)
        peer.last_answer = now
        peer.next_send = now + PERIOD
    return ""


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(talk(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6])))
