"""Owns moving a container to another node exactly once: pre-flight, dump, stream, hand-over and `recover`."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import tenacity

from kerrickpt import (
    archivewriter,
    containers,
    criu,
    faults,
    feeder,
    limits,
    logtail,
    netports,
    node,
    postcopy,
    procs,
    progress,
    schema,
    stdio,
    transport,
    zstdframe,
)
from kerrickpt.checkpoint import Subject, capture
from kerrickpt.errors import (
    BusyError,
    ContainerNotFoundError,
    KerrickptError,
    MigrationUnknown,
    NodeIncompatibleError,
    NotReadyError,
    ProtocolError,
    StateDamagedError,
    TransportError,
    UsageError,
    from_dict,
)
from kerrickpt.freezer import Freezer
from kerrickpt.manifest import VERSION as ARCHIVE_VERSION
from kerrickpt.manifest import Manifest

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ATTEMPTS = 5
CHUNK = 1 << 20
# The target restores after the last byte: its CRIU's limit grows with the archive (see feeder).
RESTORE_WAIT = 1200.0  # the target CRIU's limit (limits.RESTORE, 10 minutes by default) and as much again
MOVED = ("running", "exited", "departed")  # what the target says of a container it had
NEVER_RAN = ("absent", "failed")  # what it says of one that does not run there: only then may the source resume


@dataclass(frozen=True)
class MigrationResult:
    name: str
    target: str
    migration_id: str
    pid_map: dict[int, int]
    downtime_s: float
    attempts: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    compression: dict[str, Any] = field(default_factory=dict)  # the level, and the link speed it was chosen for
    lazy: bool = False  # post-copy: downtime_s ended before the memory had all arrived
    address: str | None = None  # its own network's address on the target; None: it shares the node's

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pid_map"] = {str(k): v for k, v in sorted(self.pid_map.items())}
        return data


@dataclass(frozen=True)
class RecoverResult:
    name: str
    migration_id: str
    outcome: str  # "moved": the target runs it, the source copy is gone; "resumed": the source runs again

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, BusyError) or (isinstance(exc, TransportError) and exc.transient)


def _retrying(attempts: int, what: str, fn: Callable[[], T]) -> tuple[T, int]:
    """Call `fn`, retrying transient failures with exponential backoff and jitter; returns (result, attempts)."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("attempt %d/%d to %s failed: %s; retrying", state.attempt_number, attempts, what, exc)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=5.0, jitter=0.5),
        retry=tenacity.retry_if_exception(_is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    result = retrying(fn)
    return result, int(retrying.statistics.get("attempt_number", 1))


@dataclass(frozen=True)
class Pending:
    """A journaled migration: its id, the link to its target and the source's scratch directory."""

    id: str
    link: transport.Link
    scratch: Path


class Journal:
    """The source's record of a migration under way: what `recover` needs after a crash or a lost answer."""

    def __init__(self, registry: containers.Registry, name: str) -> None:
        self.path = registry.journal_path(name)

    def exists(self) -> bool:
        return self.path.exists()

    def create(self, **data: Any) -> None:
        """Start the journal; fails if a migration of this container is already journaled."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise BusyError(f"a migration of {self.path.stem} is pending already") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data))
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> Pending:
        """The migration journaled; StateDamagedError if the journal is not one, which `recover` must
        not guess at: the container stays frozen, since the target may run it."""
        name, where = self.path.stem, f"the journal of the migration of {self.path.stem} ({self.path})"
        try:
            entry = schema.from_state(self.path.read_bytes(), schema.Journal, where)
            link = transport.Link.from_dict(msgspec.structs.asdict(entry.link))
        except UsageError as exc:  # a target that does not parse
            damage = f"{where} is damaged ({exc})"
        except StateDamagedError as exc:
            damage = exc.message
        else:
            return Pending(entry.id, link, Path(entry.scratch))
        raise StateDamagedError(
            f"{damage}; {name} stays frozen here, as the target may run it. Ask the target whether it does, then "
            f"remove the journal and run `kerrickpt kill {name}` if it does, `kerrickpt recover {name}` if not"
        )

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def migrate(
    name: str,
    to: str,
    *,
    ssh_options: tuple[str, ...] = (),
    remote_kerrickpt: str = "kerrickpt",
    state_dir: Path | str | None = None,
    force: bool = False,
    attempts: int = DEFAULT_ATTEMPTS,
    level: int | None = None,
    lazy: bool = False,
    log_tail: int = logtail.DEFAULT_BYTES,
    net_remap: bool = False,
) -> MigrationResult:
    """Move container `name` to the node `to` ([USER@]HOST[:PORT]) over ssh, exactly once.

    Either the target runs it and the source copy is gone, or the source runs it again;
    if the target's answer is lost, MigrationUnknown leaves the source frozen for `recover`.
    `level` is the zstd level; by default it is chosen from the link's measured speed.
    With `lazy` (post-copy), it runs on the target before its memory has all arrived: the
    downtime no longer grows with memory, but if the page transfer breaks off, the target's
    copy is killed and the source resumes from the freeze (TransportError), or stays frozen
    for `recover` if the target cannot be asked (MigrationUnknown). A confined container
    (`run --rootfs`) moves so only to a target that grants a userfaultfd inside a user
    namespace (node.lazy_pages_confined): else NotReadyError, before anything is frozen.
    Of the log, the last `log_tail` bytes travel (see logtail).

    A container with a network of its own keeps its address, MAC and TCP connections if the target's node network
    is one layer-2 segment with this node's (see network.reserve, which the target's pre-flight asks): cut off here
    while it is dumped, it is restored there cut off, connected, and announced (a gratuitous ARP). Else the
    pre-flight refuses it (NotCheckpointable; UsageError if its address or a published port is taken there), before
    anything is frozen; with `net_remap` it gets an address of the target's, its connections closed. What the
    pre-flight claims there for it stays claimed until this returns or raises (see receiver.preflight_holding).
    """
    registry = containers.Registry(state_dir)
    # What the target's pre-flight claimed for the container is held until the migration ended, whichever way.
    with registry.lock(name), contextlib.ExitStack() as hold:
        return _migrate(
            registry, name, to, ssh_options, remote_kerrickpt, force, attempts, level, lazy, log_tail, net_remap, hold
        )


def _migrate(
    registry: containers.Registry,
    name: str,
    to: str,
    ssh_options: tuple[str, ...],
    remote_kerrickpt: str,
    force: bool,
    attempts: int,
    level: int | None,
    lazy: bool,
    log_tail: int,
    net_remap: bool,
    hold: contextlib.ExitStack,
) -> MigrationResult:
    container = registry.get(name)
    registry.refuse_while_migrating(name)
    journal = Journal(registry, name)
    subject = Subject.of(container)
    if net_remap:
        if container.network is None:
            raise UsageError(
                f"--net-remap: {name} shares its node's network, so it has no address of its own to change"
            )
        _refuse_bound_to_address(name, container.init_pid, container.network.ip)
    link = transport.Link(transport.Target.parse(to), tuple(ssh_options), remote_kerrickpt).with_fast_cipher()
    found = criu.locate()
    migration_id = uuid.uuid4().hex
    request = {**_preflight_request(found, container, force), "net_remap": net_remap, "migration_id": migration_id}
    # Only a network of its own has anything the target claims for it (see receiver.preflight_holding).
    held = hold if container.network is not None else None
    progress.current().phase(f"pre-flight on {link.target}")
    answer, preflight_attempts = _retrying(
        attempts, f"pre-flight on {link.target}", lambda: _preflight(link, request, held)
    )
    readable = answer.archive_versions
    if ARCHIVE_VERSION not in readable:
        raise NodeIncompatibleError(
            f"the kerrickpt on {link.target} reads archive versions {readable}, this one writes version "
            f"{ARCHIVE_VERSION}: update kerrickpt there. {name} was not frozen."
        )
    carried = answer.confined_network if container.confinement is not None else answer.network_migration
    if container.network is not None and not carried:
        # An older kerrickpt takes the request without its network and would restore it on a bridge of its own (a
        # confined container's into a network namespace of its making, where CRIU restores the one in the images).
        kind = "a confined container's" if container.confinement is not None else "a container's"
        raise NodeIncompatibleError(
            f"the kerrickpt on {link.target} cannot carry {kind} network of its own: update kerrickpt there. "
            f"{name} was not frozen."
        )
    if lazy:
        _require_lazy_pages(link, answer, confined=container.confinement is not None)
    link_mib_s = None
    if level is None:
        link_mib_s, _ = _retrying(attempts, f"measure the link to {link.target}", lambda: transport.measure(link))
        level = zstdframe.level_for_link(link_mib_s)
    receive = ["agent", "receive", "--name", name, "--migration-id", migration_id]
    receive += [*(["--force"] if force else []), *(["--lazy"] if lazy else []), *(["--net-remap"] if net_remap else [])]
    scratch = registry.scratch_dir("migrate-")
    pages: postcopy.Source | None = None
    try:
        # The page stream first: the target's receiver connects to it before it answers ready.
        if lazy:
            pages = _open_pages(link, migration_id, found, container.group.freezer, scratch / "pages")
        # ssh and the target's kerrickpt start before the freeze, and the archive goes out as it is written.
        # A post-copy's page socket takes one receiver: no second try.
        # Only the first receiver asks whether the pre-flight still holds its claims: it answers before the freeze.
        first = [*receive, *(["--reserved"] if held is not None else [])]
        live, _ = _retrying(1 if lazy else attempts, f"open the transfer to {link.target}", lambda: _Live(link, first))
        try:
            # Written before the freeze: whatever happens next, `recover` can find out and finish it.
            journal.create(id=migration_id, link=link.to_dict(), scratch=str(scratch), started=containers.utc_now())
        except BaseException:
            live.channel.close()
            raise
    except BaseException:
        if pages is not None:
            pages.close()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        path = scratch / "archive.kckpt"
        frozen_at: list[float] = []  # of the freeze that held: the downtime's start
        try:
            manifest = capture(
                found, registry, subject, archivewriter.Writer(path, level=level, mirror=live.write),
                thaw_after_dump=False, link_mib_s=link_mib_s, lazy=pages, log_tail=log_tail, on_freeze=frozen_at.append,
            )  # fmt: skip
        except BaseException:
            live.channel.close()  # a torn stream: the target removes what it received
            if pages is not None:
                pages.close()  # capture stopped its CRIU already, if it got that far; this ends ssh
            journal.remove()  # capture thawed the container: nothing left to recover
            raise

        unconcluded: list[_Live] = [live]  # the first attempt is the one sent while the archive was written

        def attempt() -> _Answered:
            if unconcluded:
                return unconcluded.pop().conclude(link, name)
            return _transfer(link, path, receive, name)

        try:
            # A post-copy's page stream belongs to its first receiver: no second attempt.
            tries = 1 if lazy else attempts
            progress.current().phase(f"{link.target} restores it")
            answered, transfer_attempts = _retrying(tries, f"transfer to {link.target}", attempt)
        except MigrationUnknown as exc:
            if pages is not None:
                try:
                    pages.wait()  # the target may run it: it gets its memory if the link lets it
                except BaseException:
                    pages.close()  # interrupted: the target kills its copy, `recover` resumes this one
            raise exc
        except KerrickptError as exc:
            # The target never ran it (it said so, or it cannot have had the whole archive).
            if pages is not None:
                pages.close()
            containers.resume(container)
            journal.remove()
            exc.message = f"migration of {name} to {link.target} failed; {name} runs on here again: {exc.message}"
            raise
        except BaseException as exc:
            # Interrupted (Ctrl-C, SIGTERM) mid-way: the target may or may not have it.
            if pages is not None:
                pages.close()  # a post-copy's target copy is killed then: `recover` resumes this one
            raise MigrationUnknown(_unknown(name, link, f"interrupted: {type(exc).__name__}")) from exc
        restored, downtime = answered.restored, answered.at - frozen_at[0]
        if pages is not None:
            # Until every page is there, the source holds the only copy of some of its memory.
            try:
                _finish_pages(pages, link, migration_id, name, container, journal)
            except (MigrationUnknown, TransportError):
                raise  # the target's word, or that it could not be had
            except BaseException as exc:
                pages.close()  # the target kills its copy once the stream ends: `recover` resumes this one
                raise MigrationUnknown(_unknown(name, link, f"interrupted: {type(exc).__name__}")) from exc
        # Point of no return: the container runs on the target. Only now does the source copy go.
        containers.remove(registry, container)
        journal.remove()
    finally:
        if not journal.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return MigrationResult(
        name=name,
        target=str(link.target),
        migration_id=migration_id,
        pid_map=restored.pid_map,
        downtime_s=round(downtime, 4),
        attempts={"preflight": preflight_attempts, "transfer": transfer_attempts},
        warnings=answer.warnings + restored.warnings,
        timings={**manifest.timings, **_network_lock(manifest, downtime, restored)},
        compression=manifest.compression,
        lazy=lazy,
        address=restored.address,
    )


def _network_lock(manifest: Manifest, downtime: float, restored: schema.Restored) -> dict[str, float]:
    """How long a container with a network of its own was cut off: from the cut-off here (see checkpoint._cut_off)
    to its connecting on the target, which the target says how long before its answer it was. By this node's clock
    alone, to the answer's arrival (see _Answered); its trip back is counted in, so it is an upper bound, by well
    under a millisecond between the local nodes."""
    cut_off_s, answered_after_s = manifest.timings.get("cut_off_s"), restored.answered_after_s
    if cut_off_s is None or answered_after_s is None:
        return {}  # no network of its own, or a target that does not say
    return {"network_lock_s": round(downtime - cut_off_s - answered_after_s, 4)}


def _preflight(
    link: transport.Link, request: dict[str, Any], hold: contextlib.ExitStack | None = None
) -> schema.PreflightAnswer:
    """The target's pre-flight answer; raises why it cannot take the container. With `hold`, what the target claims
    for it stays claimed until `hold` closes (see receiver.answer_preflight)."""
    if hold is None:
        answer = transport.call(link, ["agent", "preflight"], request)
    else:
        channel, answer = transport.call_holding(link, ["agent", "preflight", "--hold"], request)
        hold.enter_context(channel)
    faults.inject("source-after-preflight")
    return schema.from_peer(answer, schema.PreflightAnswer, str(link.target))


def status(link: transport.Link, migration_id: str) -> schema.Status:
    """What the target says became of migration `migration_id`; ProtocolError if its answer is malformed.

    The target's `status` only looks: if a receiver or post-copy watcher of it died there, `reap`
    removes what it left (killing a copy whose memory stopped coming) and answers."""
    answer = _ask_target(link, "status", migration_id)
    if answer.state == "abandoned":
        answer = _ask_target(link, "reap", migration_id)
    return answer


def _ask_target(link: transport.Link, op: str, migration_id: str) -> schema.Status:
    answer = transport.call(link, ["agent", op, "--migration-id", migration_id], {})
    return schema.from_peer(answer, schema.Status, str(link.target))


def _preflight_request(found: criu.Criu, container: containers.Container, force: bool) -> dict[str, Any]:
    group = container.group
    pids = group.pids()
    confined = container.confinement
    with tempfile.TemporaryDirectory() as scratch:
        cpuinfo = criu.cpuinfo_dump(found, Path(scratch)).read_bytes()
    memory = group.memory_usage()
    if memory is None:
        memory = sum(procs.rss(pid) for pid in pids)
    return {
        "name": container.name,
        "fingerprint": node.fingerprint(found.version).to_dict(),
        "cpuinfo": base64.b64encode(cpuinfo).decode(),
        # The log travels in the archive, the caller's files for its output are handed in anew (see stdio);
        # everything else must already be on the target. A confined container's files are its layer's, which
        # travel, or its volumes', which the target checks.
        "files": {} if confined else procs.open_files(pids, exclude=_travelling(container)),
        "memory_bytes": memory,
        "force": force,
        "confinement": confined.to_dict() if confined else None,
        "network": container.network.identity().to_dict() if container.network else None,
    }


def _refuse_bound_to_address(name: str, init_pid: int, address: str) -> None:
    """UsageError, before the freeze, if a listener of container `name` is bound to its `address`, which
    `--net-remap` takes away: CRIU could not restore it on the target (only after the freeze would that fail)."""
    bound = [e for e in netports.listening(init_pid) if e.rsplit(":", 1)[0] == address]
    if bound:
        raise UsageError(
            f"--net-remap: {name} listens on its own address ({', '.join(bound)}), which it would not have "
            "on the target; a listener bound to 0.0.0.0 is kept. Nothing was frozen."
        )


def _travelling(container: containers.Container) -> list[str]:
    """The files of a container that need not be on the target."""
    return ([container.log] if container.log else []) + stdio.paths(container.stdio, container.init_pid)


class _Live:
    """The first transfer attempt, sent while capture writes the archive: the target takes it as CRIU dumps.

    If the link fails meanwhile, the archive is still written whole here, for the next attempts.
    """

    def __init__(self, link: transport.Link, receive: list[str]) -> None:
        self.channel = _open(link, receive)
        self.sender = transport.Sender(self.channel)
        self.failure: KerrickptError | None = None

    def write(self, data: bytes | memoryview) -> None:
        if self.failure is None:
            try:
                _send(self.sender, data)
            except KerrickptError as exc:
                self.failure = exc

    def conclude(self, link: transport.Link, name: str) -> _Answered:
        with self.channel:
            if self.failure is not None:
                raise self.failure
            return _conclude(self.sender, link, name)


def _require_lazy_pages(link: transport.Link, preflight: schema.PreflightAnswer, *, confined: bool) -> None:
    """Post-copy needs userfaultfd and big enough pipes on both nodes, and for a confined container a target
    that grants a userfaultfd inside a user namespace; say which lacks what."""
    here = node.lazy_pages(criu.locate())
    there = preflight.lazy_pages
    if here and there and confined and not preflight.lazy_pages_confined:
        raise NotReadyError(
            f"post-copy (--lazy) of a container with a user namespace of its own cannot work on {link.target}: "
            "CRIU opens its userfaultfd inside that namespace, which the kernel allows only with "
            "sysctl vm.unprivileged_userfaultfd=1 (see `kerrickpt check`). Migrate it without --lazy, or set "
            "that on the target. Nothing was frozen."
        )
    if not (here and there):
        where = " and ".join(n for n, ok in (("this node", here), (str(link.target), there)) if not ok)
        raise NotReadyError(
            f"post-copy (--lazy) cannot work on {where}: it needs userfaultfd and, for root without "
            f"CAP_SYS_RESOURCE, sysctl fs.pipe-max-size={node.LAZY_PIPE_SIZE} (see `kerrickpt check`). "
            "Nothing was frozen."
        )


def _open_pages(
    link: transport.Link, migration_id: str, found: criu.Criu, freezer: Freezer, work: Path
) -> postcopy.Source:
    try:
        return postcopy.Source(link, migration_id, found, freezer, work)
    except OSError as exc:  # ssh cannot even start (no such program, no memory)
        raise TransportError(f"cannot start ssh to {link.target}: {exc}") from exc


def _finish_pages(
    pages: postcopy.Source,
    link: transport.Link,
    migration_id: str,
    name: str,
    container: containers.Container,
    journal: Journal,
) -> None:
    """Wait until the target has every page. If the transfer broke off, the target kills its copy
    (its watcher does, the moment its daemon fails): once it says so, the source resumes.
    MigrationUnknown if the target cannot be asked."""
    # CRIU's page server exits 0 even when its peer vanished mid-way: only the target knows.
    pages.wait()
    answer = _settled(link, migration_id)
    state = answer.state if answer else None
    if state in MOVED:
        return  # every page is there
    if state in NEVER_RAN:
        containers.resume(container)
        journal.remove()
        raise TransportError(
            f"migration of {name} to {link.target} failed; {name} runs on here again: the transfer of its "
            f"memory broke off, so {link.target} killed its copy ({answer.why})",
            log_tail=answer.log_tail,
        )
    raise MigrationUnknown(_unknown(name, link, "the transfer of its memory ended, and the target could not say how"))


def _settled(link: transport.Link, migration_id: str) -> schema.Status | None:
    """The target's word on a migration once it is no longer in progress; None if it cannot be had."""
    # How long the target has to notice its page stream broke, kill its copy and say so.
    deadline = time.monotonic() + 2 * limits.SEND_STALL.seconds()
    while time.monotonic() < deadline:
        with contextlib.suppress(KerrickptError):  # the link may be back in a moment
            answer = status(link, migration_id)
            if answer.state != "in-progress":
                return answer
        time.sleep(0.2)
    return None


def _open(link: transport.Link, receive: list[str]) -> transport.Channel:
    """A channel to the target's receiver, once it is ready for the archive."""
    channel = transport.open_channel(link, receive)
    try:
        channel.ready()
    except BaseException:
        channel.close()
        raise
    return channel


def _send(sender: transport.Sender, data: bytes | memoryview) -> None:
    sender.send(data)
    if faults.is_set("transfer-cut"):
        sender.channel.proc.kill()  # the link drops for good before the end frame
        sender.channel.proc.wait()


def _transfer(link: transport.Link, path: Path, receive: list[str], name: str) -> _Answered:
    """Send the archive written here again, on a new connection (the attempts after the live one)."""
    with _open(link, receive) as channel, path.open("rb") as fh:
        sender = transport.Sender(channel)
        while chunk := fh.read(CHUNK):
            _send(sender, chunk)
        return _conclude(sender, link, name)


@dataclass(frozen=True)
class _Answered:
    """The target's `restored` answer, and when (time.monotonic) it arrived: the end of the downtime. The target's
    kerrickpt exits and ssh's session ends only afterwards (some 0.27 s between the local nodes), while the
    container runs there already: the channel's close, which waits for them, is no part of it."""

    restored: schema.Restored
    at: float


def _conclude(sender: transport.Sender, link: transport.Link, name: str) -> _Answered:
    """End the stream; returns the target's `restored` answer or raises what the target or the link said."""
    faults.inject("source-during-transfer")  # killed with all but the END frame sent
    sender.end()
    # From here on the target may restore: anything but its explicit answer leaves the outcome unknown.
    channel = sender.channel
    try:
        event = channel.event(RESTORE_WAIT + sender.tally.bytes / feeder.READ_FLOOR)
        arrived = time.monotonic()
    except KerrickptError as exc:
        raise MigrationUnknown(_unknown(name, link, str(exc))) from exc
    if event is None:
        raise MigrationUnknown(_unknown(name, link, "the target closed the connection without answering"))
    if event.get("event") == "error":
        raise from_dict(event)  # the target says it does not run it, and removed what it made
    try:
        restored = schema.from_peer(event, schema.Restored, str(link.target))
    except ProtocolError as exc:
        raise MigrationUnknown(_unknown(name, link, f"the target's answer is unreadable: {exc}")) from exc
    faults.inject("source-after-answer")  # what the source does from here on is no part of the downtime
    return _Answered(restored, arrived)


def _unknown(name: str, link: transport.Link, why: str) -> str:
    return (
        f"the outcome of moving {name} to {link.target} is unknown ({why}); {name} stays frozen here. "
        f"Run `kerrickpt recover {name}` to ask the target and finish the hand-over."
    )


def recover(name: str, *, state_dir: Path | str | None = None, attempts: int = DEFAULT_ATTEMPTS) -> RecoverResult:
    """Bring a container that an interrupted kerrickpt left frozen back to exactly one running copy.

    With a migration journaled, the target is asked what became of it; without one (a
    checkpoint killed mid-way), the container is simply thawed.
    """
    registry = containers.Registry(state_dir)
    with registry.lock(name):
        journal = Journal(registry, name)
        if not journal.exists():
            container = registry.get(name)
            if not containers.needs_recovery(container):
                raise UsageError(
                    f"{name} is neither frozen nor cut off its network, and no migration of it is pending: "
                    "nothing to recover"
                )
            containers.resume(container)
            return RecoverResult(name=name, migration_id="", outcome="resumed")
        pending = journal.read()
        link = pending.link

        def ask() -> str:
            try:
                state = status(link, pending.id).state
            except ProtocolError as exc:
                raise MigrationUnknown(
                    f"{exc}; {name} stays frozen here. Make both nodes run the same kerrickpt, then run "
                    f"`kerrickpt recover {name}` again."
                ) from exc
            if state not in (*MOVED, *NEVER_RAN, "in-progress"):  # still abandoned after the target's reap
                raise MigrationUnknown(f"{link.target} could not clean up after {name} ({state}); it stays frozen here")
            if state == "in-progress":
                raise BusyError(f"{link.target} is still receiving {name}")
            return state

        state, _ = _retrying(attempts, f"ask {link.target} about {name}", ask)
        try:
            container_here: containers.Container | None = registry.get(name)
        except ContainerNotFoundError:
            container_here = None  # removed already, by a run that died before clearing its journal
        if state in MOVED:
            # The target had it: whatever became of it since, the source copy must never run again.
            if container_here:
                containers.remove(registry, container_here)
            outcome = "moved"
        else:  # the target says it does not have it: the only answer that lets the source run again
            if container_here is None:
                raise ContainerNotFoundError(f"{name} is neither here nor on {link.target}")
            containers.resume(container_here)
            outcome = "resumed"
        journal.remove()
        shutil.rmtree(pending.scratch, ignore_errors=True)
        return RecoverResult(name=name, migration_id=pending.id, outcome=outcome)
