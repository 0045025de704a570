"""Owns `restore`: verify the archive, check this node, recreate the cgroup, restore with CRIU, register."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kerrickpt import archive, cgroups, compat, containers, criu, faults, node, procs
from kerrickpt.errors import CommandTimeout, KerrickptError, NodeIncompatibleError, RestoreFailed
from kerrickpt.manifest import Manifest


@dataclass(frozen=True)
class RestoreResult:
    name: str
    init_pid: int
    pid_map: dict[int, int]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "init_pid": self.init_pid,
            "pid_map": {str(k): v for k, v in sorted(self.pid_map.items())},
            "warnings": self.warnings,
        }


def restore(
    path: Path | str,
    *,
    name: str | None = None,
    state_dir: Path | str | None = None,
    force: bool = False,
    migration_id: str | None = None,
) -> RestoreResult:
    """Restore the archive at `path` as container `name` (default: the name it was dumped under).

    Every checksum is verified before any process is created; on failure nothing of the
    container is left on this node.
    """
    registry = containers.Registry(state_dir)
    found = criu.locate()
    scratch = registry.scratch_dir("restore-")
    try:
        manifest = archive.extract(Path(path), scratch)
        verdict = compat.compare(manifest.source, node.fingerprint(found.version))
        if not verdict.is_acceptable(force=force):
            raise NodeIncompatibleError(f"this node cannot take {path}:\n{verdict.explain()}")
        name = containers.check_name(name or manifest.name)
        init_pid = _restore_as(registry, found, manifest, scratch, name, migration_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    group = registry.get(name).group
    pid_map = {p.ns_pid: p.host_pid for p in procs.read_all(group.pids())}
    warnings = [d.message for d in verdict.differences]
    return RestoreResult(name=name, init_pid=init_pid, pid_map=pid_map, warnings=warnings)


def _restore_as(
    registry: containers.Registry,
    found: criu.Criu,
    manifest: Manifest,
    scratch: Path,
    name: str,
    migration_id: str | None,
) -> int:
    registry.reserve(name)
    group: cgroups.Cgroup | None = None
    log_fd: int | None = None
    try:
        try:
            group = cgroups.create(cgroups.detect(), name, manifest.memory_limit)
        except FileExistsError:
            raise RestoreFailed(f"cgroup {cgroups.parent_name()}/{name} exists already") from None
        inherit: dict[str, int] = {}
        if manifest.log_path:
            # The restored processes write to this container's own log, which starts
            # with what the source had written; CRIU hands them this fd in place of the
            # source's path (no size check, no clash with a source still running).
            log_fd = registry.open_log(name)
            with (scratch / "log").open("rb") as saved, os.fdopen(os.dup(log_fd), "wb") as out:
                shutil.copyfileobj(saved, out)
            inherit[manifest.log_path.lstrip("/")] = log_fd
        faults.inject("restore-before-criu")
        init_pid = _criu_restore_in(group, found, scratch, inherit)
        started = procs.start_time(init_pid)
        if started is None:
            raise RestoreFailed(f"the restored container {name} exited at once")
        registry.save(
            containers.Container(
                name=name,
                cgroup=group.to_list(),
                init_pid=init_pid,
                init_start=started,
                command=manifest.command,
                created=containers.utc_now(),
                log=str(registry.log_path(name)) if manifest.log_path else None,
                memory_limit=manifest.memory_limit,
                migration=migration_id,
            )
        )
        return init_pid
    except BaseException as exc:
        if group is not None:
            group.remove()
        registry.release(name)
        if isinstance(exc, KerrickptError) and not isinstance(exc, (RestoreFailed, CommandTimeout)):
            raise RestoreFailed(f"restore of {name} failed: {exc.message}", log_tail=exc.log_tail) from exc
        raise
    finally:
        if log_fd is not None:
            os.close(log_fd)


def _criu_restore_in(group: cgroups.Cgroup, found: criu.Criu, scratch: Path, inherit: dict[str, int]) -> int:
    """Run CRIU from a child that joined the container's cgroup, so the restored tree lands in it."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        result: dict[str, Any]
        try:
            os.close(reader)
            group.add(os.getpid())
            result = {"pid": criu.restore(found, scratch / "images", scratch, inherit_fds=inherit)}
        except KerrickptError as exc:
            result = {"error": exc.message, "log_tail": exc.log_tail, "timeout": isinstance(exc, CommandTimeout)}
        except BaseException as exc:
            result = {"error": f"{type(exc).__name__}: {exc}", "log_tail": "", "timeout": False}
        try:
            os.write(writer, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as fh:
        raw = fh.read()
    os.waitpid(child, 0)
    try:
        result = json.loads(raw)
    except ValueError:
        raise RestoreFailed("the restore helper died without an answer") from None
    if "error" in result:
        kind = CommandTimeout if result["timeout"] else RestoreFailed
        raise kind(result["error"], log_tail=result["log_tail"])
    return int(result["pid"])
