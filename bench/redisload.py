"""A client of redis-server over one connection, speaking RESP (redis's protocol): the store benchmark's redis workload
(bench/lab.py's RedisJob) and the network tests' client. Run by path, as bench/echo.py is.

`fill ADDR PORT MIB` sets the keys key:0, key:1, ... to values of VALUE_BYTES bytes (the hex text of random bytes:
it compresses about 2x, as cached text does) until redis's used_memory reaches MIB MiB, and prints
`filled keys=N used_mib=M sum=S`. `churn ADDR PORT PERCENT` sets PERCENT% of the keys, picked at random, to new values
and prints `churned keys=N sum=S`. `digest ADDR PORT` prints `digest sum=S`. S is redis's DEBUG DIGEST of the whole
data set: what it holds after the snapshots is checked against it.

`talk ADDR PORT STOPFILE` sends INCR of a key of its own every PERIOD seconds over one connection, checks that every
answer is the previous one plus 1 (none lost, none twice, no new connection) and prints `answer N` for each, then
`done N` once STOPFILE exists; it exits 1 on the first wrong or missing answer.
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from pathlib import Path

from echo import connect  # bench/echo.py, beside this file

VALUE_BYTES = 1000  # with its header, one of jemalloc's 1 KiB slots
BATCH = 1000  # commands sent at once before their answers are read: about 1 MiB
PERIOD = 0.1
ANSWER_TIMEOUT = 120.0  # a checkpoint, a migration or a digest of GiBs may hold an answer back for seconds
USED_MEMORY = re.compile(rb"^used_memory:(\d+)\r$", re.M)
Reply = bytes | int | None


class ReplyError(Exception):
    """redis answered a command with an error."""


class Connection:
    """One connection to redis: commands sent, a batch at a time, and their answers read in turn."""

    def __init__(self, address: str, port: int) -> None:
        self.sock = connect(address, port)
        self.sock.settimeout(ANSWER_TIMEOUT)
        self.stream = self.sock.makefile("rb")

    def send(self, commands: list[tuple[bytes, ...]]) -> list[Reply]:
        """Send `commands` at once, then read their answers."""
        self.sock.sendall(b"".join(encode(*c) for c in commands))
        return [self.reply() for _ in commands]

    def call(self, *args: bytes) -> Reply:
        return self.send([args])[0]

    def reply(self) -> Reply:
        line = self.stream.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"the connection ended in the middle of an answer: {line!r}")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"-":
            raise ReplyError(rest.decode(errors="replace"))
        if kind == b"$":
            if int(rest) < 0:
                return None
            return self.stream.read(int(rest) + 2)[:-2]
        raise ConnectionError(f"an answer of a kind these commands never get: {line!r}")


def encode(*args: bytes) -> bytes:
    """A command as RESP sends it: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)


def value(rng: random.Random) -> bytes:
    return rng.randbytes(VALUE_BYTES // 2).hex().encode()


def used_memory(redis: Connection) -> int:
    info = redis.call(b"INFO", b"memory")
    assert isinstance(info, bytes)
    found = USED_MEMORY.search(info)
    if found is None:
        raise ReplyError(f"INFO memory has no used_memory: {info[:200]!r}")
    return int(found.group(1))


def digest(redis: Connection) -> str:
    answer = redis.call(b"DEBUG", b"DIGEST")
    assert isinstance(answer, bytes)
    return answer.decode()


def set_keys(redis: Connection, keys: list[int], rng: random.Random) -> None:
    for start in range(0, len(keys), BATCH):
        redis.send([(b"SET", b"key:%d" % key, value(rng)) for key in keys[start : start + BATCH]])


def fill(redis: Connection, mib: int) -> None:
    rng, keys, used = random.Random(), 0, used_memory(redis)
    while used < mib << 20:
        set_keys(redis, list(range(keys, keys + BATCH)), rng)
        keys += BATCH
        used = used_memory(redis)
    print(f"filled keys={keys} used_mib={used >> 20} sum={digest(redis)}", flush=True)


def churn(redis: Connection, percent: int) -> None:
    keys = redis.call(b"DBSIZE")
    assert isinstance(keys, int)
    rng = random.Random()
    picked = rng.sample(range(keys), keys * percent // 100)
    set_keys(redis, picked, rng)
    print(f"churned keys={len(picked)} sum={digest(redis)}", flush=True)


def talk(redis: Connection, stop: Path) -> int:
    key, count = b"talk:%d" % os.getpid(), 0
    while not stop.exists():
        answer = redis.call(b"INCR", key)
        if answer != count + 1:
            print(f"INCR {key.decode()}: answer {answer!r} after {count}", flush=True)
            return 1
        count += 1
        print(f"answer {count}", flush=True)
        time.sleep(PERIOD)
    print(f"done {count}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    verb, address, port, *rest = argv
    redis = Connection(address, int(port))
    if verb == "talk":
        return talk(redis, Path(rest[0]))
    if verb == "fill":
        fill(redis, int(rest[0]))
    elif verb == "churn":
        churn(redis, int(rest[0]))
    else:
        print(f"digest sum={digest(redis)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
