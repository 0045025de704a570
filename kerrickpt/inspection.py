"""Owns `inspect`: what an operator wants to know about an archive before restoring it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerrickpt import archive, criu, node
from kerrickpt.compat import Verdict, compare
from kerrickpt.manifest import Manifest


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    archive_bytes: int
    manifest: Manifest

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.path),
            "archive_bytes": self.archive_bytes,
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


def check_archive(path: Path | str) -> Verdict:
    """Could this node restore the archive at `path`? (`kerrickpt check --against`)."""
    return compare(archive.read_manifest(Path(path)).source, node.fingerprint(criu.locate().version))


def inspect(path: Path | str) -> ArchiveInfo:
    """Read an archive's manifest (checksums are verified by `restore`)."""
    path = Path(path)
    manifest = archive.read_manifest(path)
    return ArchiveInfo(path=path, archive_bytes=path.stat().st_size, manifest=manifest)
