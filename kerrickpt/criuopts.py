"""Owns the CRIU options a confined container needs, said once as `--external`/`--inherit-fd` strings that
CRIU's RPC and its command line both take: the host mounts it binds, and the host file its output goes to."""

from __future__ import annotations

import os
from pathlib import Path

from kerrickpt import rootfs
from kerrickpt.confinement import Confinement


def _keys(confinement: Confinement) -> list[tuple[str, str]]:
    """(mount point inside, key) of each bind from the host: CRIU cannot dump those, only name them."""
    binds = [(f"/dev/{device}", f"dev-{device}") for device in rootfs.DEVICES]
    binds += [(v.target, f"host-{index}") for index, v in enumerate(rootfs.host_paths(confinement))]
    return binds


def file_key(path: Path) -> str:
    """CRIU's name for a host file the container holds open on a mount it cannot see (its log):
    `file[MOUNT_ID:INODE]`, in hex as CRIU prints them. The container's processes got it opened at this
    path, on the host's side, so on the mount this process sees there too."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        lines = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    finally:
        os.close(fd)
    fields = dict(line.split(":", 1) for line in lines)
    return f"file[{int(fields['mnt_id']):x}:{int(fields['ino']):x}]"


def dump_externals(confinement: Confinement, log_key: str | None) -> list[str]:
    return [f"mnt[{inside}]:{key}" for inside, key in _keys(confinement)] + ([log_key] if log_key else [])


def restore_externals(confinement: Confinement) -> list[str]:
    """What to bind for each key: the host's device nodes, and the binds `rootfs.bind_host_paths` made
    under rootfs.HOST_BINDS."""
    sources = [f"/dev/{device}" for device in rootfs.DEVICES]
    sources += [str(rootfs.bind_point(rootfs.HOST_BINDS, v)) for v in rootfs.host_paths(confinement)]
    return [f"mnt[{key}]:{source}" for (_, key), source in zip(_keys(confinement), sources, strict=True)]


def command_line(externals: list[str]) -> list[str]:
    return [arg for external in externals for arg in ("--external", external)]
