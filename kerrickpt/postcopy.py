"""Owns post-copy migration's memory: the page stream from the source's CRIU through ssh to the
target's lazy-pages daemon, and the watcher that kills a target copy whose memory stopped coming."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kerrickpt import cgroups, command, containers, criu, faults, limits, network, procs, schema, transport
from kerrickpt.errors import KerrickptError, RestoreFailed, TransportError
from kerrickpt.freezer import Freezer

PAGES_WAIT_S = 60.0  # for `agent pages` and the receiver to meet, either way round
IN_FLIGHT, COMPLETE, FAILED = "in-flight", "complete", "failed"
ABANDONED = "abandoned"  # in flight, but its watcher died: `reap` kills its container
CUT_AFTER = 1 << 20  # where the pages-cut fault drops the link
DAEMON_START_S = 30.0  # for CRIU's lazy-pages daemon to be ready; the receiver waits twice that
RECEIVER_CHECK_S = 5.0  # how often the watcher looks whether a receiver died before the restore


class Source:
    """The source's end: CRIU's page server on one end of a socket pair, the other relayed over a
    second ssh session to `agent pages`. No port is opened anywhere.

    CRIU works in `work` (its log), which the caller keeps until `wait` or `close` returned.
    """

    def __init__(self, link: transport.Link, migration_id: str, found: criu.Criu, freezer: Freezer, work: Path) -> None:
        self.found, self.freezer, self.work = found, freezer, work
        self.channel = transport.Channel(link, ["agent", "pages", "--migration-id", migration_id])
        self.for_criu, self.relay_end = socket.socketpair()
        self.relay = transport.Relay(self.relay_end, self.channel.stdout.fileno(), self.channel.stdin.fileno())
        self.criu: subprocess.Popen[bytes] | None = None
        self.grace = limits.LET_GO.seconds()  # read now: `stop` runs on failure paths, where it must not raise
        if faults.is_set("pages-cut"):
            threading.Thread(target=self._cut_link, daemon=True).start()

    def _cut_link(self) -> None:
        """Fault injection: the link drops for good once the page transfer is under way."""
        while self.relay.moved < CUT_AFTER and not self.relay.done.wait(0.005):
            pass
        self.channel.proc.kill()

    def dump(
        self, pid: int, images: Path, cgroup: str, shell_job: bool, external: Sequence[str], tcp_established: bool
    ) -> None:
        """The capture's dump: all but the memory CRIU serves afterwards (see checkpoint.LazyDump)."""
        self.work.mkdir(mode=0o700, exist_ok=True)
        try:
            self.criu = criu.dump_lazy(self.found, pid, images, self.work, self.for_criu, freeze_cgroup=cgroup,
                                       shell_job=shell_job, external=external,
                                       tcp_established=tcp_established)  # fmt: skip
        finally:
            self.for_criu.close()  # CRIU has its own: when it is done, the relay sees the socket end

    def wait(self) -> None:
        """Until the transfer is over: the target has every page, or the stream broke or moved nothing
        for limits.SEND_STALL (the target's daemon never pauses on its own). No deadline besides:
        a big container takes as long as its link needs. Only the target can say which it was."""
        self.relay.wait()
        self.close()

    def stop(self) -> None:
        """End the transfer: CRIU's page server loses its peer and lets go of the tree, frozen.

        While it serves, CRIU holds the tree by ptrace alone, with the cgroup thawed; it puts
        FROZEN back as it exits. A CRIU that will not exit is killed only after the cgroup is
        frozen again, or the tree would run here while the target's copy may run too; and a
        CRIU that exited without putting FROZEN back (an error path) is followed by a freeze.
        """
        self.relay.cut()  # a CRIU blocked writing to the relay gets EPIPE, one reading gets EOF
        if self.criu is None or self.criu.returncode is not None:
            return  # none, or gone already: its tree may be thawed by now, on purpose
        let_go(self.criu, self.freezer, self.grace)

    def close(self) -> None:
        """`stop`, then end ssh and the relay (once the receiver's stream is torn, `agent pages` goes too)."""
        try:
            self.stop()
        finally:
            self._close()

    def _close(self) -> None:
        """End the relay and ssh, closing each fd only once no thread of the relay can still use it."""
        if not self.relay.done.wait(1.0):
            self.channel.proc.kill()  # the thread writing to ssh may wait on it: this frees it
        self.relay.join(toward_pipe=True)
        with contextlib.suppress(OSError):
            self.channel.stdin.close()  # `agent pages` sees the end and leaves, and so does ssh
        try:
            self.channel.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.channel.proc.kill()
        self.relay.join()
        self.channel.close()
        self.relay_end.close()
        self.for_criu.close()


def let_go(page_server: subprocess.Popen[bytes], freezer: Freezer, grace: float) -> None:
    """Wait `grace` s for the source's CRIU to exit, killing it if it will not, and leave its tree frozen.

    The target may hold the container by now: whatever happens, the tree here never runs
    again. A freeze that cannot complete (a task in uninterruptible sleep) stays requested,
    CRIU is killed all the same, and FreezeTimeout says so.
    """
    try:
        page_server.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            freezer.freeze(thaw_on_timeout=False)
        finally:
            page_server.kill()
            page_server.wait()
    if not freezer.is_frozen():
        freezer.freeze(thaw_on_timeout=False)


def _socket_path(registry: containers.Registry, migration_id: str) -> Path:
    return registry.incoming(migration_id).with_suffix(".pages")


def _record_path(registry: containers.Registry, migration_id: str) -> Path:
    return registry.incoming(migration_id).with_suffix(".postcopy")


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """`path` as a socket address: through /proc/self/fd, since sun_path holds 108 bytes and a state dir may not."""
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


def serve(migration_id: str, stdin_fd: int, stdout_fd: int, state_dir: Path | str | None = None) -> None:
    """The target's end of the page stream (`agent pages`): relays between this ssh session and the
    receiver's watcher, which connects to a socket only root can reach and hands it to CRIU."""
    registry = containers.Registry(state_dir)
    path = _socket_path(registry, schema.migration_id(migration_id))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, _short(path) as address:
        try:
            listener.bind(address)  # in a 0700 directory of root's: that is the socket's authentication
        except OSError as exc:
            raise TransportError(f"cannot make the page socket {path}: {exc}") from exc
        try:
            listener.listen(1)
            listener.settimeout(PAGES_WAIT_S)  # the receiver connects before it answers ready
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                raise TransportError("no receiver came for the page stream") from None
        finally:
            path.unlink(missing_ok=True)
    with connection:
        relay = transport.Relay(connection, stdin_fd, stdout_fd)
        # A link that died without closing: the daemon must fail (and the watcher kill its container)
        # rather than leave it hanging on pages that will never come. The first page comes only
        # once the archive has arrived and the restore began.
        relay.wait(patient_first=True)
        relay.cut()


def _connect(registry: containers.Registry, migration_id: str) -> socket.socket:
    """The connection to this migration's `agent pages`, which the source started before this receiver."""
    path = _socket_path(registry, migration_id)
    deadline = time.monotonic() + PAGES_WAIT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short(path) as address:
                sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise TransportError(f"the page stream of the migration never came ({exc})", transient=True) from exc
            time.sleep(0.05)


class Watcher:
    """The target's guard of a post-copy restore: a process of its own, in its own session, that
    starts CRIU's lazy-pages daemon, outlives the receiver, and waits for the daemon to end.
    If the daemon fails, the container's memory never all arrived: what is missing would read
    as zeros, so the watcher kills the container at once and records that it failed.

    Started (and connected to the page stream) before the receiver answers ready, so that
    neither costs downtime; `start` then gives it the restore's images and cgroup.
    """

    def __init__(self, registry: containers.Registry, migration_id: str) -> None:
        self.record = _record_path(registry, migration_id)
        self.started = False
        self.grace = limits.LET_GO.seconds()  # read now: `abort` runs on failure paths, where it must not raise
        with _connect(registry, migration_id) as sock:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(sock.fileno())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                pass_fds=(sock.fileno(),),
                start_new_session=True,  # it must outlive the ssh session the receiver runs in
            )

    def start(self, found: criu.Criu, scratch: Path, group: cgroups.Cgroup, name: str) -> None:
        """Start the daemon on the images in `scratch`; from here on the watcher owns `scratch`."""
        order = {
            "criu": found.path, "version": found.version, "scratch": str(scratch), "cgroup": group.to_list(),
            "record": str(self.record), "state_dir": str(self.record.parent.parent), "name": name,
        }  # fmt: skip
        assert self.process.stdin is not None and self.process.stdout is not None
        self.started = True
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write(json.dumps(order).encode() + b"\n")
            self.process.stdin.close()
        poller = select.poll()
        poller.register(self.process.stdout, select.POLLIN)
        answer: dict[str, Any] = {}
        if poller.poll(2 * DAEMON_START_S * 1000):
            with contextlib.suppress(ValueError):
                answer = json.loads(self.process.stdout.readline() or b"{}")
        if answer.get("event") != "ready":
            self.abort()
            raise RestoreFailed(
                f"CRIU's lazy-pages daemon did not start: {answer.get('error', 'no answer')}",
                log_tail=answer.get("log_tail", ""),
            )

    def explain_exit(self) -> None:
        """The restored tree is gone before it was registered: TransportError if the watcher killed it because
        its memory stopped coming (the page stream broke), as soon as the watcher's record says so."""
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(self.record.read_text())
                if record.get("state") == FAILED:
                    raise TransportError(
                        f"the transfer of its memory broke off, so the target killed its copy ({record.get('why')})",
                        log_tail=str(record.get("log_tail", "")),
                    )
                if record.get("state") != IN_FLIGHT:
                    return
            time.sleep(0.05)

    def abort(self) -> None:
        """The restore failed: stop the daemon (the watcher then removes what it had)."""
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=self.grace)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.started:  # the receiver failed before the restore: the watcher has nothing to do
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()
            self.process.wait()


def outcome(registry: containers.Registry, migration_id: str) -> dict[str, str] | None:
    """Post-copy's state here (in-flight, complete, failed, or abandoned: its watcher died while the
    memory came), with why and the log's tail if it failed; None if no watcher started for it.
    Only looks: `reap` kills the container of an abandoned one.
    """
    path = _record_path(registry, migration_id)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if record["state"] == IN_FLIGHT and not procs.is_alive(record["pid"], record["start"]):
        record = json.loads(path.read_text())  # it may have finished just before it exited
        if record["state"] == IN_FLIGHT:
            return {"state": ABANDONED, "why": "its watcher died", "log_tail": ""}
    return {key: str(record.get(key, "")) for key in ("state", "why", "log_tail")}


def reap(registry: containers.Registry, migration_id: str) -> dict[str, str] | None:
    """`outcome`, once the container of an abandoned post-copy is killed: nobody else would kill a
    container whose memory stopped coming."""
    found = outcome(registry, migration_id)
    if found is None or found["state"] != ABANDONED:
        return found
    path = _record_path(registry, migration_id)
    record = json.loads(path.read_text())
    _fail(cgroups.Cgroup(tuple(Path(d) for d in record["cgroup"])), path, record, found["why"])
    return {**found, "state": FAILED}


def _fail(group: cgroups.Cgroup, path: Path, record: dict[str, Any], why: str, log_tail: str = "") -> None:
    """Kill the container, whose memory stopped coming, and say so before anyone can take it for moved. In this
    order, each step done before the next (the source resumes on "failed", with its connections and address):
    cut off (what its dying sockets send must not reach its peers), killed, its network and state removed, then
    recorded."""
    registry = containers.Registry(record["state_dir"])
    container = None
    with contextlib.suppress(KerrickptError, OSError):
        found = registry.get(record["name"])
        container = found if found.migration == path.stem else None
    if container is not None and container.network is not None:
        network.cut_off(container.network)
    existing = cgroups.Cgroup(tuple(d for d in group.dirs if d.exists()))
    if existing.dirs:
        existing.kill()
    if container is not None:
        try:
            containers.remove(registry, container)
        except (KerrickptError, OSError) as exc:
            # Cut off and dead, what is left answers no one: the source may resume; `kill` or `gc` removes it.
            log_tail = f"{log_tail}\nremoving the container here failed: {exc}".strip()
    containers.write_atomic(path, json.dumps({**record, "state": FAILED, "why": why, "log_tail": log_tail}))


def _watch(pages_fd: int) -> int:  # pragma: no cover - the watcher process
    order_line = sys.stdin.buffer.readline()
    if not order_line:
        return 0  # the receiver failed before the restore
    order = json.loads(order_line)
    found = criu.Criu(path=order["criu"], version=order["version"])
    scratch, path = Path(order["scratch"]), Path(order["record"])
    group = cgroups.Cgroup(tuple(Path(d) for d in order["cgroup"]))
    me = os.getpid()
    record = {key: order[key] for key in ("cgroup", "state_dir", "name")}
    record |= {"state": IN_FLIGHT, "pid": me, "start": procs.start_time(me)}
    daemon: list[subprocess.Popen[bytes]] = []
    aborted: list[bool] = []
    receiver = (os.getppid(), procs.start_time(os.getppid()))

    def abort(*_: object) -> None:
        """SIGTERM (Watcher.abort: the restore failed). Raising here could leave a daemon just
        started unwatched: the daemon is killed, now or as soon as it exists, and waited for."""
        aborted.append(True)
        for process in daemon:
            process.kill()

    signal.signal(signal.SIGTERM, abort)
    try:
        containers.write_atomic(path, json.dumps(record))
        containers.Registry.claim(scratch)  # the receiver leaves before the daemon is done with it
        with socket.socket(fileno=pages_fd) as pages:
            daemon.append(criu.lazy_pages_daemon(found, scratch / "images", scratch, pages, timeout=DAEMON_START_S))
        if aborted:
            daemon[0].kill()
        print(json.dumps({"event": "ready"}), flush=True)
        sys.stdout.close()
        code = _wait(daemon[0], receiver, record, path.stem)
        if code == 0:
            containers.write_atomic(path, json.dumps({**record, "state": COMPLETE}))
            return 0
        why = "the restore failed" if aborted else f"CRIU's lazy-pages daemon exited with {code}"
        _fail(group, path, record, why, command.tail_file(scratch / criu.LAZY_LOG))
        return code
    except BaseException as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nothing may stop the kill below
        for process in daemon:
            if process.poll() is None:
                process.kill()
                process.wait()
        failure = exc if isinstance(exc, KerrickptError) else KerrickptError(f"{type(exc).__name__} {exc}")
        _fail(group, path, record, failure.message, failure.log_tail)
        with contextlib.suppress(OSError, ValueError):
            print(json.dumps({"event": "error", "error": failure.message, "log_tail": failure.log_tail}), flush=True)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _wait(
    daemon: subprocess.Popen[bytes], receiver: tuple[int, int | None], record: dict[str, Any], migration_id: str
) -> int:
    """The daemon's exit code. It waits for a restore to connect, however long: a receiver that
    died before registering the container never will, so then the daemon is killed."""
    registered = False
    while True:
        try:
            return daemon.wait(timeout=RECEIVER_CHECK_S)
        except subprocess.TimeoutExpired:
            pass
        if registered or procs.is_alive(*receiver):
            continue
        with contextlib.suppress(KerrickptError, OSError):
            registry = containers.Registry(record["state_dir"])
            registered = registry.get(record["name"]).migration == migration_id
        if not registered:
            daemon.kill()


if __name__ == "__main__":  # pragma: no cover - started by Watcher
    sys.exit(_watch(int(sys.argv[1])))
