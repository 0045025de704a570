"""Owns kerrickpt's typed exceptions and the exit code each one maps to."""

from __future__ import annotations


class KerrickptError(Exception):
    """kerrickpt failed."""

    exit_code = 1

    def __init__(self, message: str, *, log_tail: str = "", report: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail
        self.report = report  # what was found before failing (a node's readiness, a verdict), for --json

    def __str__(self) -> str:
        if not self.log_tail:
            return self.message
        tail = "\n".join("  | " + line for line in self.log_tail.splitlines())
        return f"{self.message}\n{tail}"

    def to_dict(self) -> dict[str, object]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "exit_code": self.exit_code,
            "log_tail": self.log_tail,
            "transient": getattr(self, "transient", False),
            **({"report": self.report} if self.report is not None else {}),
        }


class UsageError(KerrickptError):
    """The request itself is wrong (bad argument, output file exists, ...)."""

    exit_code = 2


class NotReadyError(KerrickptError):
    """This node cannot checkpoint or restore: not root, or CRIU unusable."""

    exit_code = 3


class NoIdRangeError(NotReadyError):
    """This node has no free host id range for a container's users (see /etc/subuid and /etc/subgid)."""


class ContainerNotFoundError(KerrickptError):
    """No such container or cgroup on this node."""

    exit_code = 4


class DumpFailed(KerrickptError):
    """Freezing or dumping the container failed; it was thawed and keeps running."""

    exit_code = 5


class ArchiveCorruptError(KerrickptError):
    """The archive is corrupt, truncated, incomplete or unreadable."""

    exit_code = 6


class ArchiveUnreadableError(ArchiveCorruptError):
    """The archive could not be read (an I/O error): that says nothing about its contents."""


class ChunkDamagedError(ArchiveCorruptError):
    """A chunk of a deduplicating store is damaged or gone: every snapshot that names it is corrupt until a later
    snapshot holding the same content stores it again (see `Chunks.mark_damaged`)."""

    def __init__(self, message: str, *, chunk: int) -> None:
        super().__init__(message)
        self.chunk = chunk


class RecipeSealError(ArchiveCorruptError):
    """A sealed recipe fails to open where it is: it was moved or renamed (it is sealed to its container and snapshot
    id), changed or damaged. Never judged corrupt (nor pruned, nor its chunks freed, for it): renaming it back may be
    all it needs."""


class StoreUnreadableError(ArchiveUnreadableError):
    """A deduplicating store's chunk index or folders could not be read or written (an I/O error, a full disk):
    that says nothing of any one snapshot, so nothing is judged or freed by it."""


class StoreDamagedError(StoreUnreadableError):
    """A deduplicating store's chunk index is missing, empty, not a database or damaged: the store as a whole is,
    not any one snapshot, so none is judged corrupt by it (nor pruned for it)."""


class NodeIncompatibleError(KerrickptError):
    """This node cannot take the archive (architecture, CPU, kernel, CRIU...)."""

    exit_code = 7


class StoreFormatError(NodeIncompatibleError):
    """The snapshot store, its index or a recipe in it was written by a newer kerrickpt: refused unread."""


class RestoreFailed(KerrickptError):
    """CRIU could not restore the container; nothing of it was left behind."""

    exit_code = 8


class ContainerExistsError(KerrickptError):
    """A container with that name already exists on this node."""

    exit_code = 9


class CommandTimeout(KerrickptError):
    """An external program did not finish in time and was killed."""

    exit_code = 10


class TransportError(KerrickptError):
    """ssh could not reach the target or the connection broke; `transient` says whether a retry may help."""

    exit_code = 11

    def __init__(self, message: str, *, log_tail: str = "", transient: bool = False) -> None:
        super().__init__(message, log_tail=log_tail)
        self.transient = transient


class ProtocolError(TransportError):
    """The peer's message is malformed (wrong type, out of range, unknown): permanent, never retried."""

    def __init__(self, message: str, *, log_tail: str = "", transient: bool = False) -> None:
        super().__init__(message, log_tail=log_tail, transient=False)


class MigrationUnknown(KerrickptError):
    """The target's answer was lost: the source stays frozen until `kerrickpt recover` asks the target."""

    exit_code = 12


class BusyError(KerrickptError):
    """Another kerrickpt is working on this container (here, or receiving it on the target); try again later."""

    exit_code = 13


class NotCheckpointable(KerrickptError):
    """The job uses something kerrickpt cannot carry; it was thawed if it had been frozen, and runs on."""

    exit_code = 14


class StateDamagedError(KerrickptError):
    """A container's record in the state directory is unreadable; `kerrickpt kill NAME` still ends it."""

    exit_code = 15


class HostError(KerrickptError):
    """The host refused an operation (a cgroup write, a full disk, a permission): the message says which."""

    exit_code = 16


class SourceNotEnded(KerrickptError):
    """The archive is complete, but the checkpointed container could not all be ended: the message says what is left."""

    exit_code = 18


class ExitedAtOnce(KerrickptError):
    """The container's command exited as it started (`pid`, its init, whose exit status its parent may reap)."""

    def __init__(self, message: str, *, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class ContainerDamaged(KerrickptError):
    """CRIU was stopped, or died, while its code may have been inside the container's processes:
    they may not run correctly, so the container is left frozen for the operator to end (or thaw)."""

    exit_code = 17
    keeps_frozen = True  # what the freeze and the guardian see: this failure must not thaw the container


class SnapshotNotFoundError(KerrickptError):
    """The snapshot store holds no snapshot that matches."""

    exit_code = 20


class UntrustedStoreError(KerrickptError):
    """A snapshot store or series directory that someone other than root could write in: refused unused."""

    exit_code = 21


class NotAllowedError(KerrickptError):
    """Not allowed to a user through sudo: only their own jobs, as themselves, in the site's checkpoints."""

    exit_code = 22


class KeyUnusableError(KerrickptError):
    """Encrypted data and no key, the wrong key, or a key file that cannot be used (missing, readable by others,
    damaged, or its passphrase wrong or not given): nothing was read or written."""

    exit_code = 23


class Interrupted(KeyboardInterrupt):
    """SIGHUP, SIGINT or SIGTERM arrived: unwinds like Ctrl-C (guards thaw, scratch goes), exit 128+N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


def from_dict(data: dict[str, object]) -> KerrickptError:
    """Rebuild an error a remote kerrickpt reported, as its own class where this side knows it."""
    classes = {cls.__name__: cls for cls in _all_subclasses(KerrickptError)}
    cls = classes.get(str(data.get("error")), KerrickptError)
    error = cls(str(data.get("message", "remote error")), log_tail=str(data.get("log_tail") or ""))
    if isinstance(error, TransportError) and not isinstance(error, ProtocolError):
        error.transient = bool(data.get("transient"))
    return error


def _all_subclasses(cls: type[KerrickptError]) -> list[type[KerrickptError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found
