"""Owns `inspect`: what an operator wants to know about an archive before restoring it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerrickpt import archive, criu, node, sealed
from kerrickpt.compat import Verdict, compare
from kerrickpt.keys import Key
from kerrickpt.manifest import Manifest


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    archive_bytes: int
    manifest: Manifest | None  # None: it is sealed, and its key was not given
    sealing: sealed.Header | None = None

    def to_dict(self) -> dict[str, Any]:
        known = {
            "path": str(self.path),
            "archive_bytes": self.archive_bytes,
            "encryption": self.sealing.to_dict() if self.sealing else None,
        }
        m = self.manifest
        if m is None:
            return known
        return {
            **known,
            "name": m.name,
            "created": m.created,
            "criu_version": m.criu_version,
            "source": m.source.to_dict(),
            "processes": m.processes,
            "memory_bytes": m.memory_bytes,
            "image_bytes": m.image_bytes,
            "memory_limit": m.memory_limit,
            "namespaces": m.namespaces,
            "timings": m.timings,
            "pid_namespace": m.pid_namespace,
            "restore_route": restore_route(m),
            "ipc_objects": m.ipc,
            "compression": m.compression,
            "checksum": m.checksum,
            "log_start": m.log_start,
            "confinement": m.confinement.to_dict() if m.confinement else None,
            "network": m.network.to_dict() if m.network else None,
            "connections": m.connections,
            "layer_bytes": m.layer_bytes,
            "members": [{"name": x.name, "size": x.size, "digest": x.digest} for x in m.members],
        }


def restore_route(manifest: Manifest) -> str:
    """In words: which namespaces the restore of this archive will give the processes."""
    if manifest.pid_namespace == "host":
        return (
            "the job shared the host's namespaces: restore gives it new IPC and PID namespaces in which it "
            "has its own PIDs (or, with --pid-namespace host, its PIDs on the host)"
        )
    if manifest.confinement is not None:
        return (
            "own user, mount, PID, IPC and UTS namespaces, restored as dumped by CRIU, on a root of its own: "
            "its lower layer and the file-system layer the archive carries"
        )
    return "own PID, IPC and UTS namespaces, restored as dumped by CRIU"


def check_archive(path: Path | str, key: Key | None = None) -> Verdict:
    """Could this node restore the archive at `path` (sealed with `key`, if given)? (`kerrickpt check --against`)."""
    return compare(archive.read_manifest(Path(path), key).source, node.fingerprint(criu.locate().version))


def inspect(path: Path | str, key: Key | None = None) -> ArchiveInfo:
    """Read an archive's manifest (checksums are verified by `restore`): of a sealed one only with its `key`;
    without, only how it is sealed."""
    path = Path(path)
    sealing = archive.sealing(path)
    manifest = None if sealing is not None and key is None else archive.read_manifest(path, key)
    return ArchiveInfo(path=path, archive_bytes=path.stat().st_size, manifest=manifest, sealing=sealing)
