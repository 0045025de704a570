"""kerrickpt: checkpoint/restart for Linux containers and process trees, built on CRIU.

The typed API a scheduler calls; the `kerrickpt` command is a thin layer over it.
"""

from kerrickpt.archive import DEFAULT_LEVEL
from kerrickpt.checkpoint import CheckpointResult, checkpoint
from kerrickpt.compat import Verdict
from kerrickpt.containers import ContainerStatus, kill, ps, run
from kerrickpt.errors import (
    ArchiveCorruptError,
    BusyError,
    CommandTimeout,
    ContainerExistsError,
    ContainerNotFoundError,
    DumpFailed,
    KerrickptError,
    MigrationUnknown,
    NodeIncompatibleError,
    NotCheckpointable,
    NotReadyError,
    RestoreFailed,
    TransportError,
    UsageError,
)
from kerrickpt.inspection import ArchiveInfo, check_archive, inspect
from kerrickpt.manifest import Manifest
from kerrickpt.migrate import MigrationResult, RecoverResult, migrate, recover
from kerrickpt.node import Fingerprint, Report, check
from kerrickpt.restore import RestoreResult, restore

__all__ = [
    "DEFAULT_LEVEL",
    "ArchiveCorruptError",
    "ArchiveInfo",
    "BusyError",
    "CheckpointResult",
    "CommandTimeout",
    "ContainerExistsError",
    "ContainerNotFoundError",
    "ContainerStatus",
    "DumpFailed",
    "Fingerprint",
    "KerrickptError",
    "Manifest",
    "MigrationResult",
    "MigrationUnknown",
    "NodeIncompatibleError",
    "NotCheckpointable",
    "NotReadyError",
    "RecoverResult",
    "Report",
    "RestoreFailed",
    "RestoreResult",
    "TransportError",
    "UsageError",
    "Verdict",
    "check",
    "check_archive",
    "checkpoint",
    "inspect",
    "kill",
    "migrate",
    "ps",
    "recover",
    "restore",
    "run",
]
