"""Owns the CRIU options a confined container needs, said once as `--external`/`--inherit-fd` strings that
CRIU's RPC and its command line both take: the host mounts it binds, the host files its output goes to, and
the network namespace of its own that kerrickpt makes (see network), or for a confined container the interface
kerrickpt makes for the one CRIU restores."""

from __future__ import annotations

import os
from pathlib import Path

from kerrickpt import netlinks, rootfs
from kerrickpt.confinement import Confinement


def _keys(confinement: Confinement) -> list[tuple[str, str]]:
    """(mount point inside, key) of each bind from the host: CRIU cannot dump those, only name them."""
    binds = [(f"/dev/{device}", f"dev-{device}") for device in rootfs.DEVICES]
    binds += [(v.target, f"host-{index}") for index, v in enumerate(rootfs.host_paths(confinement))]
    return binds


def file_key(path: Path) -> str:
    """CRIU's name for a host file the container holds open on a mount it cannot see (its log): see fd_key.
    The container's processes got it opened at this path, on the host's side, so on the mount this process
    sees there too."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd_key(fd)
    finally:
        os.close(fd)


def fd_key(fd: int) -> str:
    """CRIU's name for the file open at `fd`, as `--external` and `--inherit-fd` take it: `file[MOUNT_ID:INODE]`,
    in hex as CRIU prints them."""
    lines = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    return f"file[{int(fields['mnt_id']):x}:{int(fields['ino']):x}]"


def handed_as_is(key: str) -> str:
    """The `--inherit-fd` name under which CRIU uses an fd as it is for the external file `key`. CRIU names an
    external file after its key less the first character (as it names /tmp/x `tmp/x`), and takes an fd given
    under that name as the file; one given under `key` it reopens (/proc/self/fd/N) as the restored task, which
    the root of a confined container may not do for a file that is not its own (its caller's output file), and
    refuses a file whose mode differs from the archived one's."""
    return key[1:]


def dump_externals(confinement: Confinement, log_key: str | None) -> list[str]:
    return [f"mnt[{inside}]:{key}" for inside, key in _keys(confinement)] + ([log_key] if log_key else [])


def restore_externals(confinement: Confinement) -> list[str]:
    """What to bind for each key: the host's device nodes, and the binds `rootfs.bind_host_paths` made
    under rootfs.HOST_BINDS."""
    sources = [f"/dev/{device}" for device in rootfs.DEVICES]
    sources += [str(rootfs.bind_point(rootfs.HOST_BINDS, v)) for v in rootfs.host_paths(confinement)]
    return [f"mnt[{key}]:{source}" for (_, key), source in zip(_keys(confinement), sources, strict=True)]


# The `--inherit-fd` key under which a restore hands CRIU the network namespace of a container that shares the
# node's users. kerrickpt makes that namespace itself (its interfaces, addresses and routes from the container's
# record), so CRIU names it rather than dumping it, and restores the processes and their sockets into the one made
# for the restore. (A confined container's is dumped: see netdev_external.)
NETNS_KEY = "kerrickpt-netns"


def netns_external(pin: Path) -> str:
    """The `--external` that names the network namespace pinned at `pin` as NETNS_KEY."""
    return f"net[{os.stat(pin).st_ino}]:{NETNS_KEY}"


def netdev_external(unplaced: str) -> str:
    """The restore's `--external` that has CRIU move the interface `unplaced`, which kerrickpt made on the node (see
    network.create_unplaced), into the network namespace it restores, as the container's netlinks.INSIDE: a confined
    container's network namespace is its user namespace's, so CRIU dumps and restores it (interfaces, addresses,
    routes) with its processes; the veth's node end stays kerrickpt's to make, on the bridge and cut off until the
    restore is recorded (see restore), as for any container with a network of its own."""
    return f"netdev[{netlinks.INSIDE}]:{unplaced}"


def command_line(externals: list[str]) -> list[str]:
    return [arg for external in externals for arg in ("--external", external)]
