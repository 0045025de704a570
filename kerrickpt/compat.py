"""Owns the verdict on whether a checkpoint from one node may be restored on another."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kerrickpt.node import Fingerprint

FATAL = "fatal"  # never accepted, not even with --force
ERROR = "error"  # refused unless forced
WARNING = "warning"


@dataclass(frozen=True)
class Difference:
    field: str
    severity: str
    source: str
    target: str
    message: str


@dataclass(frozen=True)
class Verdict:
    differences: tuple[Difference, ...]

    def is_acceptable(self, *, force: bool = False) -> bool:
        refused = {FATAL} if force else {FATAL, ERROR}
        return not any(d.severity in refused for d in self.differences)

    def explain(self) -> str:
        return "\n".join(f"{d.severity}: {d.field}: {d.message}" for d in self.differences) or "compatible"

    def to_dict(self) -> dict[str, object]:
        return {"compatible": self.is_acceptable(), "differences": [asdict(d) for d in self.differences]}


def _version_key(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.replace("-", ".").split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def compare(source: Fingerprint, target: Fingerprint) -> Verdict:
    """Every way `target` differs from `source` that matters for a restore, with its severity."""
    found: list[Difference] = []

    def differ(name: str, severity: str, message: str) -> None:
        found.append(Difference(name, severity, str(getattr(source, name)), str(getattr(target, name)), message))

    if source.arch != target.arch:
        differ("arch", FATAL, f"images from {source.arch} cannot run on {target.arch}")
    missing = sorted(set(source.cpu_flags) - set(target.cpu_flags))
    if missing:
        found.append(
            Difference("cpu_flags", FATAL, "", " ".join(missing), f"the target lacks CPU features: {' '.join(missing)}")
        )
    if source.page_size != target.page_size:
        differ("page_size", FATAL, "page sizes differ")
    if _version_key(target.criu_version) < _version_key(source.criu_version):
        differ("criu_version", ERROR, "the target's CRIU is older than the one that wrote the images")
    if _version_key(target.kernel) < _version_key(source.kernel):
        differ("kernel", ERROR, "the target runs an older kernel")
    elif source.kernel != target.kernel:
        differ("kernel", WARNING, "kernel releases differ")
    if source.os_release != target.os_release:
        differ("os_release", WARNING, "OS releases differ")
    if source.cgroup_layout != target.cgroup_layout:
        differ("cgroup_layout", WARNING, "cgroup layouts differ")
    return Verdict(tuple(found))
