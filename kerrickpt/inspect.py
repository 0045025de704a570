"""Owns `inspect`: what an operator wants to know about an archive before restoring it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kerrickpt import archive
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
            "restore_route": "new IPC and PID namespaces, own PIDs inside"
            if m.pid_namespace == "host"
            else "own namespaces as dumped",
            "ipc_objects": m.ipc,
            "members": [{"name": x.name, "size": x.size, "sha256": x.sha256} for x in m.members],
        }


def inspect(path: Path | str) -> ArchiveInfo:
    """Read an archive's manifest (checksums are verified by `restore`)."""
    path = Path(path)
    manifest = archive.read_manifest(path)
    return ArchiveInfo(path=path, archive_bytes=path.stat().st_size, manifest=manifest)
