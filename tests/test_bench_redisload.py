"""bench/redisload.py against a real redis-server on loopback: it fills redis to the size asked and rewrites its share
of keys, and its talking client, the network tests' judge of a connection, fails as soon as an answer is not the
previous one plus 1."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.lab import REDISLOAD, redis_server
from tests.helpers import Client

LOOPBACK = "127.0.0.1"


@pytest.fixture
def port() -> Iterator[int]:
    """A redis-server listening on a free port of loopback (and nowhere else), killed afterwards."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        free = probe.getsockname()[1]
    server = subprocess.Popen([*redis_server(free), "--bind", LOOPBACK], stdout=subprocess.DEVNULL)
    try:
        yield free
    finally:
        server.kill()
        server.wait(timeout=30)


def _redisload(*args: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, str(REDISLOAD), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(field.split("=", 1) for field in done.stdout.split()[1:])


def test_redisload_fills_redis_to_its_size_and_rewrites_its_share_of_keys(port: int) -> None:
    filled = _redisload("fill", LOOPBACK, str(port), "16")
    assert 16 <= int(filled["used_mib"]) <= 17  # one batch of keys, about 1 MiB, past the size asked for
    churned = _redisload("churn", LOOPBACK, str(port), "5")
    assert int(churned["keys"]) == int(filled["keys"]) * 5 // 100
    assert churned["sum"] != filled["sum"]
    assert _redisload("digest", LOOPBACK, str(port)) == {"sum": churned["sum"]}


def test_the_talking_client_fails_on_the_first_answer_that_is_not_the_previous_plus_one(
    port: int, tmp_path: Path
) -> None:
    client = Client.start([], LOOPBACK, port, tmp_path)
    try:
        client.wait_more(3)
        # Another connection counts on the client's key once: its next answer skips one, as a lost request would.
        other = subprocess.run(["redis-cli", "-h", LOOPBACK, "-p", str(port), "INCR", f"talk:{client.process.pid}"],
                               capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
        skipped = int(other.stdout)

        assert client.process.wait(timeout=30) == 1
        assert client.answers() == list(range(1, skipped))
        assert f"INCR talk:{client.process.pid}: answer {skipped + 1} after {skipped - 1}" in client.output.read_text()
    finally:
        client.end()
