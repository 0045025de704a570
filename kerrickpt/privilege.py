"""Owns who asks for a job and what they may ask: root itself, or a user through the site's sudo rule."""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kerrickpt import command, helper, isolation, trust, users
from kerrickpt.confinement import HOST, HOST_ROOT, RANGE, parse_volume
from kerrickpt.containers import NAME_MAX, check_name
from kerrickpt.errors import (
    CommandTimeout,
    NoIdRangeError,
    NotAllowedError,
    NotReadyError,
    UntrustedStoreError,
    UsageError,
)
from kerrickpt.idmap import LAST, LOWEST
from kerrickpt.isolation import IdPool
from kerrickpt.manifest import Manifest

CONFIG = Path("/etc/kerrickpt/jobs.toml")
# Another site configuration, for tests: honoured for root itself only, never through sudo.
CONFIG_ENV = "KERRICKPT_JOBS_CONFIG"
ACCESS_TIMEOUT = 30.0  # a volume on storage that hangs must not hold the job forever
WHAT = "the jobs' checkpoints directory"


@dataclass(frozen=True)
class Caller:
    """Who asks: root itself, or the user sudo ran kerrickpt for (`through_sudo`)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str
    through_sudo: bool


@dataclass(frozen=True)
class Site:
    """What the site configured in CONFIG: `checkpoints`, on storage every node shares, holds
    `<uid>/<name>/` for each user's job; users' jobs take their id ranges from `ids` alone, host ids that
    the site declares no user has and that root's own containers never get (see jobs_pool)."""

    checkpoints: Path
    ids: IdPool


@dataclass(frozen=True)
class RunOptions:
    """The options of `kerrickpt job` the policy rules on (the others, --env and --memory-limit, are the
    caller's own business)."""

    rootfs: str | None = None
    user: str | None = None
    volumes: tuple[str, ...] = ()
    ids: str | None = None
    state_dir: str | None = None


@dataclass(frozen=True)
class JobRequest:
    """What a job runs with once the policy has ruled: where its checkpoints live, its options, and the pool
    its container's id range comes from (None: the node's, as for `kerrickpt run`)."""

    directory: Path
    options: RunOptions
    pool: IdPool | None = None
    container: str | None = None  # its container's name on the node, if not the job's


def caller() -> Caller:
    """Who runs this kerrickpt. Sudo resets the environment and then sets SUDO_UID, SUDO_GID and SUDO_USER
    itself, so a user cannot forge them through the site's rule; root with them set (a `sudo -i` shell)
    is taken for that user, which fails closed."""
    if os.getuid() != 0:
        raise NotReadyError("kerrickpt job needs root: run it through sudo (see the README's Jobs run by users)")
    sudo_uid = os.environ.get("SUDO_UID", "0")
    if sudo_uid == "0":
        return Caller(0, os.getgid(), tuple(os.getgroups()), "root", through_sudo=False)
    try:
        uid, gid = int(sudo_uid), int(os.environ["SUDO_GID"])
        entry = pwd.getpwuid(uid)
    except (KeyError, ValueError):
        raise NotAllowedError(
            f"not allowed to a user through sudo: SUDO_UID={sudo_uid!r} and SUDO_GID name no user of this node"
        ) from None
    if os.environ.get("SUDO_USER", entry.pw_name) != entry.pw_name:
        raise NotAllowedError(f"not allowed to a user through sudo: SUDO_USER does not name uid {uid}")
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))
    return Caller(uid, gid, groups, entry.pw_name, through_sudo=True)


def site(who: Caller) -> Site:
    """The site's configuration for users' jobs; root must own it and alone be able to change it."""
    path = CONFIG if who.through_sudo else Path(os.environ.get(CONFIG_ENV) or CONFIG)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotReadyError(f"users' jobs are not set up on this node: there is no {path}") from None
    except OSError as exc:
        raise NotReadyError(f"cannot read the jobs' configuration {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise UntrustedStoreError(
                f"refusing the jobs' configuration {path}: it must be a file of root's that only root can write"
            )
        trust.check_tree(path.parent, "the directory of the jobs' configuration")
        try:
            data = tomllib.loads(fh.read().decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise NotReadyError(f"the jobs' configuration {path} is unreadable: {exc}") from None
    checkpoints = data.get("checkpoints")
    if not isinstance(checkpoints, str) or not checkpoints.startswith("/"):
        raise NotReadyError(f"the jobs' configuration {path} must set checkpoints to an absolute path")
    return Site(Path(checkpoints), _declared_ids(data.get("ids"), path))


def _declared_ids(value: object, path: Path) -> IdPool:
    """The jobs' pool `ids = "FIRST:COUNT"` declares: whole ranges of RANGE ids, from LOWEST up to LAST."""
    first, _, count = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not (first.isdigit() and count.isdigit()):
        raise NotReadyError(
            f"the jobs' configuration {path} must set ids = \"FIRST:COUNT\": the host ids users' jobs take their "
            "id ranges from, which no user has and root's own containers never get (see contrib/jobs.toml)"
        )
    start, size = int(first), int(count)
    if start < LOWEST or size < RANGE or start + size - 1 > LAST:
        raise NotReadyError(
            f"the jobs' configuration {path}: ids {value} must hold at least {RANGE} ids, from {LOWEST} on, "
            f"up to {LAST}"
        )
    return isolation.declared_pool(start, size, f"ids of {path}")


def jobs_pool(who: Caller, where: Site) -> IdPool:
    """The site's pool for users' jobs, once it is known to be theirs alone: it shares no id with the pool of
    the node's own containers (whose files, on volumes, outlive them, and whose ranges a job's root must never
    be), and holds none of the caller's ids (which the job keeps the host's own)."""
    node = isolation.id_pool()
    if where.ids.overlaps(node):
        raise NotReadyError(
            f"the {where.ids.source} overlap the id pool of this node's own containers ({node.source}): the "
            "jobs' ids must be theirs alone (see the README's What the site must ensure)"
        )
    held = where.ids.holding([who.uid], {who.gid, *who.groups} - {0})
    if held:
        raise NoIdRangeError(
            f"the {where.ids.source} hold {who.name}'s own {', '.join(held)}: the site must give users' jobs "
            "host ids that no user has"
        )
    return where.ids


def checkpoint_dir(where: Site, uid: int, name: str) -> Path:
    """`<checkpoints>/<uid>/<name>`, made root's and 0700 if it is not yet, after checking that only root
    controls the checkpoints directory and every directory above it: whoever could write there could plant
    the CRIU images that root then restores."""
    check_name(name)
    if not where.checkpoints.is_dir():
        raise NotReadyError(f"{WHAT} {where.checkpoints} does not exist: the site creates it (root's, 0755)")
    trust.check_tree(where.checkpoints, WHAT)
    path = Path(os.path.realpath(where.checkpoints))
    for part in (str(uid), name):
        path = path / part
        path.mkdir(mode=0o700, exist_ok=True)
        trust.check(path, WHAT)
        # A job's images hold its memory: nobody but root reads them, whatever the umask made of the mode.
        os.chmod(path, 0o700, follow_symlinks=False)
    return path


def job_request(
    who: Caller, name: str, directory: str | None, options: RunOptions, *, where: Site | None = None
) -> JobRequest:
    """What the job `name` may run with. Root itself gets what it asks (its `directory`, else the site's
    directory for uid 0). A user through sudo runs as themselves, their uid and groups the host's own and every
    other id (root's first) of an unprivileged range (`--ids host`), over the node's own root, their
    checkpoints in the site's directory for their uid, and binds in only what they could reach themselves;
    anything else raises NotAllowedError. Its range comes from the site's pool for users' jobs (jobs_pool).
    `where` defaults to `site(who)`."""
    if not who.through_sudo:
        found = Path(directory) if directory else checkpoint_dir(where or site(who), 0, name)
        return JobRequest(found, options)
    refused = [flag for flag, asked in (("--dir", directory), ("--state-dir", options.state_dir)) if asked is not None]
    if options.rootfs not in (None, HOST_ROOT):
        refused.append(f"--rootfs {options.rootfs}")
    if options.ids not in (None, HOST):
        refused.append(f"--ids {options.ids}")
    if refused:
        raise NotAllowedError(
            f"not allowed to a user through sudo: {', '.join(refused)} (a user's job runs over the node's own "
            "root with --ids host, its checkpoints in the site's directory for that user)"
        )
    gid = _own_group(who, options.user)
    volumes = tuple(_reachable_volume(who, text) for text in options.volumes)
    forced = replace(options, rootfs=HOST_ROOT, ids=HOST, user=f"{who.uid}:{gid}", volumes=volumes)
    container = container_name(who, name)
    where = where or site(who)
    pool = jobs_pool(who, where)
    return JobRequest(checkpoint_dir(where, who.uid, name), forced, pool, container)


def container_name(who: Caller, name: str) -> str:
    """The container of `who`'s job `name` on a node, `u<uid>.<name>`: two users' jobs of one name may meet there."""
    container = f"u{who.uid}.{name}"
    if len(container) > NAME_MAX:
        longest = NAME_MAX - len(container) + len(name)
        raise UsageError(f"job name {name!r} too long: a user's job name has at most {longest} characters")
    return container


def check_archive(who: Caller, manifest: Manifest) -> None:
    """Refuse to restore for a user through sudo an archive whose processes are not that user's (with none
    of the user's groups they may have lost since), that binds in what they can no longer reach, or that has a
    network of its own. Its ids are compared as the archive records them, never through its map: the restore
    gives it a range of its own."""
    if not who.through_sudo:
        return
    confined = manifest.confinement
    if confined is None or confined.rootfs != HOST_ROOT or not confined.host_ids or confined.idmapped_lower:
        raise NotAllowedError(
            f"not allowed to a user through sudo: the archive of {manifest.name} is not a job run for a user"
        )
    if manifest.network is not None:
        # Its restore would claim an address of the node network and forward node ports to it.
        raise NotAllowedError(
            f"not allowed to a user through sudo: the archive of {manifest.name} has a network of its own"
        )
    if confined.uid != who.uid or confined.uid == 0:
        raise NotAllowedError(
            f"not allowed to a user through sudo: the archive of {manifest.name} runs as uid {confined.uid}, "
            f"not {who.uid}"
        )
    # Group 0 is the container's root's, of its range: it gives nothing on the host.
    lost = sorted({confined.gid, *confined.groups} - {0, who.gid, *who.groups})
    if lost:
        raise NotAllowedError(
            f"not allowed to a user through sudo: the archive of {manifest.name} runs with group(s) "
            f"{', '.join(map(str, lost))} that {who.name} is not in"
        )
    for volume in confined.volumes:
        _check_reach(who, volume.source, write=not volume.read_only)


def can_reach(who: Caller, path: str, *, write: bool) -> bool:
    """Whether `who`, as themselves, can read `path` (and search it if a directory; write it if `write`).
    Asked of the kernel as that user, so that every directory above, ACLs and mount options count."""
    tests = ["-r", path] + (["-a", "-w", path] if write else [])
    if os.path.isdir(path):
        tests += ["-a", "-x", path]
    return command.run([*as_user(who), "test", *tests], timeout=ACCESS_TIMEOUT).returncode == 0


def as_user(who: Caller) -> list[str]:
    """The prefix that runs a program as `who` (their uid, gid and groups); none for root itself."""
    if not who.through_sudo:
        return []
    groups = ["--groups", ",".join(map(str, who.groups))] if who.groups else ["--clear-groups"]
    return ["setpriv", "--reuid", str(who.uid), "--regid", str(who.gid), *groups, "--"]


def open_as(who: Caller, path: str, flags: int, mode: int = 0o644) -> int:
    """A descriptor of `path` opened (os.open `flags`) as `who` would open it, for a file a user names that
    root then writes (as `--events FILE`): the kernel decides, as for any open of theirs, and what it
    creates is theirs. Root itself opens it here. It is never waited for (a FIFO without a reader)."""
    if not who.through_sudo:
        return os.open(path, flags, mode)
    ours, theirs = socket.socketpair()
    with ours, helper.start("open-as", pass_fds=(theirs.fileno(),)) as process:
        # The helper runs in /: a relative path is the caller's, from here.
        order = {"socket": theirs.fileno(), "path": os.path.abspath(path), "flags": flags, "mode": mode}
        helper.send(process, {**order, "uid": who.uid, "gid": who.gid, "groups": list(who.groups)})
        theirs.close()
        ours.settimeout(ACCESS_TIMEOUT)
        try:
            answer, fds, _, _ = socket.recv_fds(ours, 64, 1)
        except TimeoutError:
            command.stop(process)
            raise CommandTimeout(f"opening {path} as {who.name} did not finish within {ACCESS_TIMEOUT:.0f} s") from None
    if fds:
        os.set_blocking(fds[0], True)
        os.set_inheritable(fds[0], False)
        return fds[0]
    code = int(answer) if answer.isdigit() else errno.EIO
    if code in (errno.EACCES, errno.EPERM):
        raise NotAllowedError(f"not allowed to a user through sudo: {who.name} cannot open {path}")
    raise UsageError(f"cannot open {path}: {os.strerror(code)}")


def main(order: dict[str, Any]) -> None:  # pragma: no cover - the helper program (open_as)
    """Become the user, open the file, and hand its descriptor (or the errno) back over the socket."""
    with socket.socket(fileno=order["socket"]) as back:
        os.setgroups(order["groups"])
        os.setresgid(order["gid"], order["gid"], order["gid"])
        os.setresuid(order["uid"], order["uid"], order["uid"])
        try:
            fd = os.open(order["path"], order["flags"] | os.O_NONBLOCK | os.O_NOCTTY, order["mode"])
        except OSError as exc:
            back.sendall(str(exc.errno).encode())
            return
        socket.send_fds(back, [b"ok"], [fd])


def _own_group(who: Caller, spec: str | None) -> int:
    """The group a user's job runs with: their primary group, or the one `--user` names if it is the
    caller's own user and one of their groups."""
    if spec is None:
        return who.gid
    try:
        account = users.resolve(spec, Path("/"))
    except UsageError:
        account = None
    if account is None or account.uid != who.uid or account.gid not in (who.gid, *who.groups):
        raise NotAllowedError(f"not allowed to a user through sudo: --user {spec} (a job runs as {who.name})")
    return account.gid


def _reachable_volume(who: Caller, text: str) -> str:
    """The volume `text` as it will be bound, if `who` can reach it: asked of the path as given first, so
    that root's answers (whether it exists, where its links lead) tell nothing of what the user cannot see."""
    _check_reach(who, text.split(":")[0], write=False)
    volume = parse_volume(text)
    _check_reach(who, volume.source, write=not volume.read_only)
    return f"{volume.source}:{volume.target}:{'ro' if volume.read_only else 'rw'}"


def _check_reach(who: Caller, source: str, *, write: bool) -> None:
    if not can_reach(who, source, write=write):
        how = "read and write" if write else "read"
        raise NotAllowedError(f"not allowed to a user through sudo: {who.name} cannot {how} the volume {source}")
