"""kerrickpt: checkpoint/restart for Linux containers and process trees, built on CRIU.

The typed API a scheduler calls; the `kerrickpt` command is a thin layer over it.
"""

from kerrickpt.checkpoint import CheckpointResult, checkpoint
from kerrickpt.compat import Verdict
from kerrickpt.containers import ContainerStatus, kill, ps, run
from kerrickpt.errors import (
    ArchiveCorruptError,
    BusyError,
    CommandTimeout,
    ContainerDamaged,
    ContainerExistsError,
    ContainerNotFoundError,
    DumpFailed,
    HostError,
    Interrupted,
    KerrickptError,
    KeyUnusableError,
    MigrationUnknown,
    NodeIncompatibleError,
    NotCheckpointable,
    NotReadyError,
    RestoreFailed,
    SnapshotNotFoundError,
    SourceNotEnded,
    StateDamagedError,
    TransportError,
    UsageError,
)
from kerrickpt.garbage import Leftover, gc
from kerrickpt.inspection import ArchiveInfo, check_archive, inspect
from kerrickpt.job import Job, job
from kerrickpt.keys import Key
from kerrickpt.lock import Holder
from kerrickpt.logs import logs
from kerrickpt.manifest import Manifest
from kerrickpt.migrate import MigrationResult, RecoverResult, migrate, recover
from kerrickpt.node import Fingerprint, Report, check
from kerrickpt.restore import RestoreResult, restore
from kerrickpt.retention import Decision, Plan, Policy
from kerrickpt.session import exec_in
from kerrickpt.snapshot import SnapshotResult, snapshot
from kerrickpt.store import Snapshot, Store
from kerrickpt.supervisor import REQUEUE_EXIT, JobResult
from kerrickpt.zstdframe import CHECKPOINT_LEVEL, DEFAULT_LEVEL

__all__ = [
    "CHECKPOINT_LEVEL",
    "DEFAULT_LEVEL",
    "REQUEUE_EXIT",
    "ArchiveCorruptError",
    "ArchiveInfo",
    "BusyError",
    "CheckpointResult",
    "CommandTimeout",
    "ContainerDamaged",
    "ContainerExistsError",
    "ContainerNotFoundError",
    "ContainerStatus",
    "Decision",
    "DumpFailed",
    "Fingerprint",
    "Holder",
    "HostError",
    "Interrupted",
    "Job",
    "JobResult",
    "KerrickptError",
    "Key",
    "KeyUnusableError",
    "Leftover",
    "Manifest",
    "MigrationResult",
    "MigrationUnknown",
    "NodeIncompatibleError",
    "NotCheckpointable",
    "NotReadyError",
    "Plan",
    "Policy",
    "RecoverResult",
    "Report",
    "RestoreFailed",
    "RestoreResult",
    "Snapshot",
    "SnapshotNotFoundError",
    "SnapshotResult",
    "SourceNotEnded",
    "StateDamagedError",
    "Store",
    "TransportError",
    "UsageError",
    "Verdict",
    "check",
    "check_archive",
    "checkpoint",
    "exec_in",
    "gc",
    "inspect",
    "job",
    "kill",
    "logs",
    "migrate",
    "ps",
    "recover",
    "restore",
    "run",
    "snapshot",
]
