"""Owns the `kerrickpt` command line: it parses arguments, calls the library and prints."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import kerrickpt
from kerrickpt import (
    cgroups,
    containers,
    keys,
    layerchain,
    logtail,
    network,
    postcopy,
    privilege,
    progress,
    receiver,
    retention,
    slurm,
    transport,
)
from kerrickpt.confinement import ID_MODES, OWN, parse_env
from kerrickpt.errors import (
    ArchiveCorruptError,
    HostError,
    Interrupted,
    KerrickptError,
    KeyUnusableError,
    NodeIncompatibleError,
    NotReadyError,
    UsageError,
)
from kerrickpt.events import Events
from kerrickpt.inspection import restore_route
from kerrickpt.migrate import DEFAULT_ATTEMPTS
from kerrickpt.supervisor import REQUEUE_EXIT, Supervisor, parse_duration

EXAMPLES = """\
examples:
  kerrickpt check
  kerrickpt run --name job1 --memory-limit 512M -- /usr/bin/python3 -u train.py
  kerrickpt run --name job2 --rootfs host --user 1000 --volume /scratch/job2:/data --workdir /data -- ./solve
  kerrickpt ps
  kerrickpt exec job1 -- ps -ef
  kerrickpt exec job1 --user nobody --workdir /tmp --env LANG=C.UTF-8 -- sh -c 'ls -l'
  kerrickpt logs -f job1
  kerrickpt checkpoint job1 -o /srv/ckpt/job1.kckpt
  kerrickpt checkpoint job1 -o /srv/ckpt/job1-copy.kckpt --leave-running
  kerrickpt checkpoint --cgroup /sys/fs/cgroup/batch/job7 -o job7.kckpt
  kerrickpt checkpoint job3 -o /shared/job3.kckpt --encrypt --key-file /etc/kerrickpt/ckpt.key
  kerrickpt restore /shared/job3.kckpt --key-file /etc/kerrickpt/ckpt.key
  kerrickpt inspect /srv/ckpt/job1.kckpt
  kerrickpt restore /srv/ckpt/job1.kckpt --name job1
  kerrickpt restore job7.kckpt --pid-namespace host
  kerrickpt kill job1
  kerrickpt gc --dry-run
  kerrickpt check --against /srv/ckpt/job1.kckpt
  kerrickpt migrate job1 --to root@node7 --ssh-option IdentityFile=/etc/kerrickpt/id_ed25519
  kerrickpt recover job1
  kerrickpt snapshot job1 --store /srv/snap --keep-last 4 --keep-hourly 24 --keep-daily 7 --wait 300 --quiet
  kerrickpt snapshots init --store /srv/snap
  kerrickpt snapshots init --store /srv/secret --encrypt --key-file /etc/kerrickpt/snap.key
  kerrickpt snapshots list --store /srv/snap job1
  kerrickpt snapshots prune --store /srv/snap --keep-daily 7 --keep-weekly 4 --dry-run
  kerrickpt snapshots verify --store /srv/snap
  kerrickpt restore --store /srv/snap job1 --at 2025-01-31T14:00 --name job1-then
  kerrickpt key create /etc/kerrickpt/snap.key
  kerrickpt job --name train --dir /shared/ckpt --signal USR1 --every 30m -- ./train --epochs 100
  sudo -n kerrickpt job --name train --volume "$PWD:/work" --workdir /work -- ./train   # as a user

exit codes: 0 ok, 1 other error, 2 usage, 3 not root or CRIU unusable, 4 container not found,
  5 dump failed, 6 archive corrupt or unreadable (an encrypted one: changed without its key),
  7 node incompatible, 8 restore failed,
  9 container exists, 10 an external program timed out and was stopped,
  11 ssh failed, the other side's message was malformed, the other side's (older) kerrickpt
  refused its arguments, or the target's pre-flight no longer holds its claims (nothing frozen),
  12 migration outcome unknown
  (the source stays frozen: run `kerrickpt recover NAME`), 13 busy (here or on the target),
  14 the job uses something kerrickpt cannot carry (nothing was frozen),
  15 a container's record (`kerrickpt kill NAME` still ends it) or migration journal is damaged,
  16 the host refused an operation (permission, full disk, cgroup write),
  17 CRIU stopped or died with its code perhaps inside the container (left frozen),
  18 checkpoint: archive complete, but the container could not all be ended (`kerrickpt kill NAME`),
  20 no such snapshot in the store, 21 a snapshot store or series others than root may write in,
  23 encrypted and no key or the wrong key given, or the key file is unusable (not 0600, bad passphrase),
  129/130/143 ended by SIGHUP/SIGINT/SIGTERM (after unwinding)
job: once its command runs, the command's exit code (128+N: signal N); 85 checkpointed on the
  scheduler's signal, requeue me; 128+N cancelled by signal N; 22 not allowed to a user through sudo
exec: once its command runs, the command's exit code (128+N: ended by signal N; 126/127: it could not
  be run / was not found); before that, the codes above (4: no such container running)
"""


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _size(value: int) -> str:
    """Bytes for people: snapshots of small containers are a few KiB."""
    if value < 1024:
        return f"{value} B"
    size, unit = value / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _local(when: datetime) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _policy(args: argparse.Namespace) -> kerrickpt.Policy:
    return kerrickpt.Policy(
        last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily, weekly=args.keep_weekly
    )


PASSPHRASE_ENV = "KERRICKPT_PASSPHRASE"
KEY_FILE_ENV = "KERRICKPT_KEY_FILE"


def _passphrase(*, twice: bool = False) -> bytes:
    """A key file's passphrase: $KERRICKPT_PASSPHRASE (cron), or asked on the terminal."""
    # Taken out of the environment once read: CRIU and the rest this command runs inherit it otherwise.
    given = os.environ.pop(PASSPHRASE_ENV, None)
    if given is not None:
        return given.encode()
    if not sys.stdin.isatty():
        raise KeyUnusableError(f"the key file's passphrase: set ${PASSPHRASE_ENV}, or run on a terminal to be asked")
    first = getpass.getpass("passphrase: ")
    if twice and getpass.getpass("again: ") != first:
        raise UsageError("the two passphrases differ")
    return first.encode()


def _key(args: argparse.Namespace) -> keys.Key | None:
    """The key of --key-file (or $KERRICKPT_KEY_FILE), or None if neither is given."""
    path = args.key_file or os.environ.get(KEY_FILE_ENV)
    return keys.load(Path(path), _passphrase) if path else None


def _sealing_key(args: argparse.Namespace) -> keys.Key | None:
    """The key `--encrypt` seals with (see `_key`), None without --encrypt. --encrypt without a key is a usage
    error (exit 2, as the key without --encrypt is), said before any key file is read."""
    if args.encrypt and not (args.key_file or os.environ.get(KEY_FILE_ENV)):
        raise UsageError(f"--encrypt needs a key: --key-file FILE or ${KEY_FILE_ENV} (`kerrickpt key create FILE`)")
    return _key(args) if args.encrypt else None


def cmd_key_create(args: argparse.Namespace) -> tuple[Any, int]:
    key = keys.create(args.file, _passphrase(twice=True) if args.passphrase else None)
    if not args.json:
        print(f"key {key.id} written to {args.file} (0600); keep a copy elsewhere: what it seals is lost without it")
    return {"key_file": str(args.file), "key_id": key.id, "passphrase": args.passphrase}, 0


def _time(text: str) -> datetime:
    """--at: ISO 8601 (local time unless it says otherwise) or a snapshot id."""
    try:
        return datetime.fromisoformat(text).astimezone()
    except ValueError:
        raise UsageError(
            f"--at {text!r} is not a time: give e.g. 2025-01-31T14:00 or an id from `snapshots list`"
        ) from None


def _watched(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    """Progress of the library call in the block, on a terminal only: cleared before the command prints."""
    what = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    return progress.on_terminal(what, sys.stderr, quiet=args.quiet or args.json)


def cmd_check(args: argparse.Namespace) -> tuple[Any, int]:
    if args.against:
        return _check_against(args)
    report = kerrickpt.check(args.state_dir)
    if not args.json:
        fp = report.fingerprint
        print(f"ready: {'yes' if report.ready else 'no'}")
        print(f"criu: {report.criu_path or 'not found'} {report.criu_version or ''}".rstrip())
        print(f"criu check: {report.criu_check.splitlines()[-1] if report.criu_check else '-'}")
        print(f"cgroups: {report.cgroups['kind']} {json.dumps(report.cgroups)}")
        print("features: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in report.features.items()))
        if report.id_ranges:
            pool = report.id_ranges
            spans = f"uids {_spans(pool['uids'])}, gids {_spans(pool['gids'])}"
            print(f"id ranges: {pool['ranges']} of 65536 ids, {pool['held']} held ({spans}; {pool['source']})")
        if fp:
            print(f"node: {fp.arch}, kernel {fp.kernel}, {fp.os_release}, page size {fp.page_size}")
            print(f"cpu flags: {len(fp.cpu_flags)}")
        for problem in report.problems:
            print(f"problem: {problem}")
        for note in report.notes:
            print(f"note: {note}")
    if not report.ready:
        raise NotReadyError("this node is not ready: " + "; ".join(report.problems), report=report.to_dict())
    return report.to_dict(), 0


def _spans(spans: Any) -> str:
    return " ".join(f"{first}-{first + count - 1}" for first, count in spans) or "none"


def _check_against(args: argparse.Namespace) -> tuple[Any, int]:
    verdict = kerrickpt.check_archive(args.against, _key(args))
    acceptable = verdict.is_acceptable(force=args.force)
    if not args.json:
        print(verdict.explain())
        print(f"verdict: {'this node can restore it' if acceptable else 'this node cannot restore it'}")
    if not acceptable:
        raise NodeIncompatibleError(
            f"this node cannot restore {args.against}:\n{verdict.explain()}", report=verdict.to_dict()
        )
    return verdict.to_dict(), 0


def _command(args: argparse.Namespace) -> list[str]:
    return args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd


def _memory_limit(args: argparse.Namespace) -> int | None:
    try:
        return cgroups.parse_size(args.memory_limit) if args.memory_limit else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _asked(args: argparse.Namespace) -> privilege.RunOptions:
    return privilege.RunOptions(
        rootfs=args.rootfs, user=args.user, volumes=tuple(args.volume), ids=args.ids, state_dir=args.state_dir
    )


def _container_options(args: argparse.Namespace, chosen: privilege.RunOptions) -> dict[str, Any]:
    """`run`'s container options as the library takes them; `chosen`: those a job's policy rules on."""
    return {
        "memory_limit": _memory_limit(args),
        "rootfs": chosen.rootfs,
        "user": chosen.user,
        "volumes": chosen.volumes,
        "env": parse_env(args.env),
        "workdir": args.workdir,
        "ids": chosen.ids or OWN,
    }


def cmd_run(args: argparse.Namespace) -> tuple[Any, int]:
    status = kerrickpt.run(
        args.name,
        _command(args),
        state_dir=args.state_dir,
        net=args.net,
        address=args.ip,
        publish=args.publish,
        **_container_options(args, _asked(args)),
    )
    if not args.json:
        inside = status.init_ns_pid or "-"
        at = f", address {status.address}" if status.address else ""
        print(f"started {status.name}: init pid {status.init_pid} (pid {inside} inside), {status.state}{at}")
    return status.to_dict(), 0


def cmd_job(args: argparse.Namespace) -> tuple[Any, int]:
    who = privilege.caller()
    request = privilege.job_request(who, args.name, args.dir, _asked(args))
    preempting = _signal(args.signal)
    as_user = privilege.as_user(who)
    if slurm.escapes_signals(as_user=as_user) is False:
        raise NotReadyError(
            "kerrickpt job needs Slurm's ProctrackType=proctrack/cgroup: with another, Slurm's SIGTERM of a requeue "
            "reaches the job's processes before kerrickpt can checkpoint them (see the README's Preemptible jobs)"
        )
    # Slurm says how long a job has after each signal (asked as the job's user); --grace overrides both.
    after_term = args.grace if args.grace is not None else slurm.grace(True, as_user=as_user)
    after_signal = args.grace if args.grace is not None else slurm.grace(False, as_user=as_user)
    stdio = {name: fd for name, fd in (("stdout", 1), ("stderr", 2)) if stat.S_ISREG(os.fstat(fd).st_mode)}
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    job = Supervisor(
        args.name,
        _command(args),
        request.directory,
        state_dir=request.options.state_dir,
        every=parse_duration(args.every) if args.every else None,
        grace=after_signal,
        keep=args.keep,
        events=Events.open(args.events, args.name, opener=lambda path: privilege.open_as(who, path, flags)),
        level=args.level,
        container=request.container,
        admit=lambda manifest: privilege.check_archive(who, manifest),
        pool=request.pool,
        **_container_options(args, request.options),
        **stdio,
    )

    def asked(signum: int, _frame: object) -> None:
        arrived = time.monotonic()
        # SIGTERM is both Slurm's requeue and its scancel: Slurm counts a requeue's restart before it signals.
        if signum == preempting and signum != signal.SIGTERM:
            job.preempt()
        elif signum == signal.SIGTERM and slurm.is_requeue(as_user=as_user):
            # The grace time runs from the signal, not from Slurm's answer.
            job.preempt(None if after_term is None else after_term - (time.monotonic() - arrived))
        else:
            job.cancel(signum)

    with _handling({preempting, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}, asked):
        result = job.run()
    return result.to_dict(), result.exit_code


def _signal(name: str) -> signal.Signals:
    text = name.upper()
    try:
        return (
            signal.Signals(int(text))
            if text.isdigit()
            else signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
        )
    except (KeyError, ValueError):
        raise UsageError(f"--signal {name}: no such signal (examples: TERM, USR1, 10)") from None


@contextlib.contextmanager
def _handling(signals: set[signal.Signals], handler: Callable[[int, object], None]) -> Iterator[None]:
    """`handler` for `signals` in the block; the caller's handlers come back afterwards."""
    before = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


def cmd_exec(args: argparse.Namespace) -> tuple[Any, int]:
    argv = args.cmd
    if argv[:1] and argv[0].startswith("-"):
        # Options after NAME (`exec NAME --user U -- CMD`) land among CMD's words: parse them here.
        if "--" not in argv:
            raise UsageError("kerrickpt exec: put `--` between the options and the command")
        split = argv.index("--")
        _exec_options().parse_args(argv[:split], namespace=args)
        argv = argv[split + 1 :]
    code = kerrickpt.exec_in(
        args.name, argv, user=args.user, workdir=args.workdir, env=args.env, state_dir=args.state_dir
    )
    return None, code


def cmd_logs(args: argparse.Namespace) -> tuple[Any, int]:
    out = sys.stdout.buffer
    chunks = kerrickpt.logs(args.name, follow=args.follow, state_dir=args.state_dir)
    try:
        for chunk in chunks:
            out.write(chunk)
            out.flush()
    except BrokenPipeError:
        # The reader left (`| head`): that ends the command, and Python must not complain at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        chunks.close()
    return None, 0


def cmd_ps(args: argparse.Namespace) -> tuple[Any, int]:
    rows = kerrickpt.ps(args.state_dir)
    if not args.json:
        print(f"{'NAME':<24} {'STATE':<9} {'PID':>8} {'NSPID':>5} {'PROCS':>5} {'MEMORY':>12} {'LIMIT':>12}")
        for r in rows:
            print(
                f"{r.name:<24} {r.state:<9} {r.init_pid or '-':>8} {r.init_ns_pid or '-':>5} "
                f"{'-' if r.processes is None else r.processes:>5} "
                f"{_mib(r.memory_bytes):>12} {_mib(r.memory_limit):>12}"
            )
    return [r.to_dict() for r in rows], 0


def cmd_kill(args: argparse.Namespace) -> tuple[Any, int]:
    kerrickpt.kill(args.name, args.state_dir)
    if not args.json:
        print(f"killed {args.name}")
    return {"name": args.name, "killed": True}, 0


def cmd_gc(args: argparse.Namespace) -> tuple[Any, int]:
    removed = kerrickpt.gc(args.state_dir, dry_run=args.dry_run)
    if not args.json:
        verb = "would remove" if args.dry_run else "removed"
        for leftover in removed:
            print(f"{verb} {leftover.kind} {leftover.path}: {leftover.why}")
    return {"dry_run": args.dry_run, "removed": [leftover.to_dict() for leftover in removed]}, 0


def cmd_checkpoint(args: argparse.Namespace) -> tuple[Any, int]:
    if args.key_file and not args.encrypt:
        raise UsageError("--key-file: add --encrypt to encrypt the archive with it")
    key = _sealing_key(args)
    with _watched(args):
        result = kerrickpt.checkpoint(
            args.name,
            args.output,
            cgroup=args.cgroup,
            leave_running=args.leave_running,
            state_dir=args.state_dir,
            level=args.level,
            log_tail=args.log_tail,
            key=key,
        )
    if not args.json:
        t = result.manifest.timings
        after = "left running" if result.left_running else "stopped"
        sealed = f", encrypted with key {key.id}" if key else ""
        print(
            f"checkpointed {result.name} to {result.archive} ({_mib(result.archive_bytes)}{sealed}; "
            f"frozen {t.get('frozen_s', 0):.3f} s, dump {t.get('dump_s', 0):.3f} s, "
            f"compress {t.get('compress_s', 0):.3f} s); container {after}"
        )
    return result.to_dict(), 0


def cmd_restore(args: argparse.Namespace) -> tuple[Any, int]:
    path, bases = args.archive, []
    key = _key(args)
    if args.store:
        when = _time(args.at) if args.at else None
        store = kerrickpt.Store(args.store, key)
        if store.deduplicates:
            store.seal()  # an encrypted store's key, before anything is read
        *below, top = store.restorable(args.archive, when, allow_unverified=args.allow_unverified)
        path, bases = top.path, [s.path for s in below]
    elif args.at or args.latest or args.allow_unverified:
        raise UsageError("--at and --latest pick a snapshot from a store: give --store DIR and a container name")
    with _watched(args):
        result = kerrickpt.restore(
            path,
            name=args.name,
            state_dir=args.state_dir,
            force=args.force,
            pid_namespace=args.pid_namespace,
            bases=bases,
            tcp_close=args.tcp_close,
            key=key,
        )
    if not args.json:
        if args.store:
            print(f"snapshot {path}")
        _print_placed(f"restored {result.name}: init pid {result.init_pid}", result.warnings, result.pid_map)
    return {**result.to_dict(), "archive": str(path)}, 0


def _print_placed(headline: str, warnings: list[str], pid_map: dict[int, int]) -> None:
    """What restore and migrate tell a person: warnings, what happened, where the PIDs went."""
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(headline)
    print("pid map (inside -> host):")
    for inside, host in sorted(pid_map.items()):
        print(f"  {inside} -> {host}")


def cmd_inspect(args: argparse.Namespace) -> tuple[Any, int]:
    info = kerrickpt.inspect(args.archive, _key(args))
    if not args.json:
        m = info.manifest
        print(f"archive:   {info.path} ({_mib(info.archive_bytes)})")
        if info.sealing:
            print(f"encrypted: {info.sealing.method}, key {info.sealing.key_id}")
        if m is None:
            print("(the rest is encrypted: give its key file with --key-file to see it)")
            return info.to_dict(), 0
        src = m.source
        print(f"container: {m.name}, taken {m.created}")
        print(f"source:    {src.arch}, kernel {src.kernel}, {src.os_release}, CRIU {m.criu_version}")
        print(f"memory:    {_mib(m.memory_bytes)} in pages, {_mib(m.image_bytes)} of images")
        print(f"limits:    memory {_mib(m.memory_limit)}")
        print("timings:   " + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(m.timings.items())))
        level = m.compression.get("level", "?")
        link = f" (chosen for a {m.compression['link_mib_s']} MiB/s link)" if "link_mib_s" in m.compression else ""
        print(f"format:    zstd level {level}{link}, {m.checksum} checksums")
        print(f"route:     {restore_route(m)}")
        if m.network:
            published = ", ".join(map(str, m.network.ports)) or "no node port"
            print(f"network:   its own: {m.network.address}, MAC {m.network.mac}, publishes {published}")
            print(f"           {len(m.connections)} established TCP connections carried")
            for connection in m.connections:
                print(f"  {connection}")
        if m.confinement:
            c = m.confinement
            root = "an overlay of the node's root" if c.rootfs == "host" else f"an overlay of {c.rootfs}"
            seen = "seen through its id map" if c.idmapped_lower else "as is (host owners outside its range: nobody)"
            seen = "as is (host owners but its user: nobody)" if c.host_ids else seen
            carried = f"what changed since snapshot {m.layer_base['snapshot']}" if m.layer_base else "its layer"
            print(f"root:      {root}, its lower layer {seen}; {carried} {_mib(m.layer_bytes)} (as a tar)")
            if c.host_ids:
                print(f"users:     ids host: runs as {c.uid}:{c.gid}, its user's own host ids (and groups); "
                      f"its other ids 0-{c.ids - 1} are host ids {c.uid_base}- (uid), {c.gid_base}- (gid); "
                      "root and volumes nosuid")  # fmt: skip
            else:
                print(f"users:     ids own: ids 0-{c.ids - 1} inside are host ids {c.uid_base}- (uid), {c.gid_base}- "
                      f"(gid); runs as {c.uid}:{c.gid}")  # fmt: skip
            for v in c.volumes:
                print(f"volume:    {v.source} -> {v.target}{' (read-only)' if v.read_only else ''}, not carried")
        print("processes (pid inside, host pid at dump, threads, command):")
        for p in m.processes:
            print(f"  {p['ns_pid']:>5} {p['host_pid']:>8} {p['threads']:>3}  {' '.join(p['cmdline'])}")
        if m.ipc:
            print("SysV objects carried (recreated with these keys and ids in the job's new IPC namespace):")
            for q in m.ipc["queues"]:
                print(f"  message queue key {q['key']} id {q['id']}: {len(q['messages'])} messages")
            for sem in m.ipc["semaphores"]:
                print(f"  semaphore set key {sem['key']} id {sem['id']}: values {sem['values']}")
    return info.to_dict(), 0


def cmd_migrate(args: argparse.Namespace) -> tuple[Any, int]:
    with _watched(args):
        result = kerrickpt.migrate(
            args.name,
            args.to,
            ssh_options=tuple(args.ssh_option),
            remote_kerrickpt=args.remote_kerrickpt,
            state_dir=args.state_dir,
            force=args.force,
            attempts=args.attempts,
            level=args.level,
            log_tail=args.log_tail,
            lazy=args.lazy,
            net_remap=args.net_remap,
        )
    if not args.json:
        headline = f"moved {result.name} to {result.target}: down {result.downtime_s:.3f} s"
        if result.address:
            headline += f", at {result.address}"
        _print_placed(headline, result.warnings, result.pid_map)
    return result.to_dict(), 0


def cmd_recover(args: argparse.Namespace) -> tuple[Any, int]:
    result = kerrickpt.recover(args.name, state_dir=args.state_dir, attempts=args.attempts)
    if not args.json:
        where = "runs on the target; the source copy is gone" if result.outcome == "moved" else "runs here again"
        print(f"{result.name} {where}")
    return result.to_dict(), 0


def cmd_agent(args: argparse.Namespace) -> tuple[Any, int]:
    """The remote end of `migrate` and `recover`: JSON events on stdout, never other output."""
    if args.op == "receive":
        code = receiver.receive(
            sys.stdin.buffer,
            sys.stdout,
            name=args.name,
            migration_id=args.migration_id,
            force=args.force,
            lazy=args.lazy,
            net_remap=args.net_remap,
            reserved=args.reserved,
            state_dir=args.state_dir,
        )
        return None, code
    if args.op == "pages":
        postcopy.serve(args.migration_id, sys.stdin.fileno(), sys.stdout.fileno(), args.state_dir)
        return None, 0
    if args.op == "preflight":
        receiver.answer_preflight(sys.stdin.buffer, sys.stdout, hold=args.hold, state_dir=args.state_dir)
        return None, 0
    if args.op == "sink":
        answer = transport.sink(sys.stdin.buffer)
    elif args.op == "reap":
        answer = receiver.reap(args.migration_id, args.state_dir)
    else:
        answer = receiver.status(args.migration_id, args.state_dir)
    transport.emit(sys.stdout, "ok", **answer)
    return None, 0


def cmd_snapshot(args: argparse.Namespace) -> tuple[Any, int]:
    with _watched(args):
        result = kerrickpt.snapshot(
            args.name,
            args.store,
            cgroup=args.cgroup,
            policy=_policy(args),
            wait=args.wait,
            state_dir=args.state_dir,
            level=args.level,
            log_tail=args.log_tail,
            key=_key(args),
            encrypt=args.encrypt,
        )
    if not args.quiet:
        print(_log_line(result), file=sys.stderr)
    return result.to_dict(), 0


def _log_line(result: kerrickpt.SnapshotResult) -> str:
    """The one line a run logs: what was taken, what retention did, what was cleaned up."""
    snap = result.snapshot
    words = [
        f"kerrickpt: snapshot {snap.name} {snap.id}: {_size(snap.archive_bytes)}, "
        f"frozen {snap.frozen_s or 0:.3f} s, took {result.duration_s:.2f} s"
    ]
    if result.plan:
        removed = ", ".join(s.id for s in result.removed) or "none"
        words.append(f"kept {len(result.plan.kept)}, removed {removed}")
    if result.took_over:
        words.append(f"took over the lock of a run that died ({result.took_over.describe()})")
    if result.cleaned:
        words.append(f"removed {len(result.cleaned)} leftovers of dead runs")
    return "; ".join(words)


def cmd_snapshots_list(args: argparse.Namespace) -> tuple[Any, int]:
    store = kerrickpt.Store(args.store)  # a listing needs no key: none is loaded (nor its passphrase asked)
    rows = store.list(args.name)
    broken = store.broken(rows)
    if not args.json:
        print(
            f"{'NAME':<24} {'SNAPSHOT':<20} {'TIME':<19} {'SIZE':>12} {'FROZEN':>8} {'NODE':<16} {'LAYER':<29} "
            f"{'KEY':<16} STATUS"
        )
        for r in rows:
            frozen = "-" if r.frozen_s is None else f"{r.frozen_s:.3f}s"
            status = f"{r.status}, unusable (its base is gone or corrupt)" if r.path in broken else r.status
            print(
                f"{r.name:<24} {r.id:<20} {_local(r.time):<19} {_size(r.archive_bytes):>12} {frozen:>8} "
                f"{r.node or '-':<16} {layerchain.describe(r):<29} {r.key or '-':<16} {status}"
            )
    return _snapshot_rows(rows, broken), 0


def _snapshot_rows(rows: list[kerrickpt.Snapshot], broken: dict[Path, str]) -> list[dict[str, Any]]:
    """`list`'s and `verify`'s JSON: each snapshot, its base, and why it is unusable if it is."""
    return [{**r.to_dict(), "base": r.base, "unusable": broken.get(r.path)} for r in rows]


def cmd_snapshots_init(args: argparse.Namespace) -> tuple[Any, int]:
    if not args.encrypt and (args.key_file or os.environ.get(KEY_FILE_ENV)):
        raise UsageError(f"a key was given (--key-file or ${KEY_FILE_ENV}): add --encrypt for an encrypted store")
    key = _sealing_key(args)
    store = kerrickpt.Store.deduplicating(args.store, key)
    if not args.json:
        sealed = f", encrypted with key {store.key_id}" if store.key_id else ""
        print(f"{store.root}: a deduplicating snapshot store{sealed}")
    return {"store": str(store.root), "deduplicates": True, "encrypted": bool(store.key_id), "key_id": store.key_id}, 0


def cmd_snapshots_prune(args: argparse.Namespace) -> tuple[Any, int]:
    policy = _policy(args)
    plans = kerrickpt.Store(args.store, _key(args)).prune(args.name, policy, dry_run=args.dry_run, wait=args.wait)
    gone = "would remove" if args.dry_run else "removed"
    if not args.json:
        for sentence in policy.describe():
            print(f"rule: {sentence}")
        for plan in plans.values():
            for d in plan.decisions:
                verdict = "keep" if d.keep else gone
                print(f"{verdict:<12} {d.item.name} {d.item.id} ({_local(d.item.time)}): {', '.join(d.reasons)}")
    result = {
        name: [{"id": d.item.id, "keep": d.keep, "reasons": list(d.reasons)} for d in plan.decisions]
        for name, plan in plans.items()
    }
    return {"dry_run": args.dry_run, "rules": policy.to_dict(), "containers": result}, 0


def cmd_snapshots_verify(args: argparse.Namespace) -> tuple[Any, int]:
    with _watched(args):
        store = kerrickpt.Store(args.store, _key(args))
        rows = store.verify(args.name, wait=args.wait)
    broken = store.broken(rows)
    for r in rows:
        if r.corrupt:
            print(f"kerrickpt: corrupt: {r.path}: {r.error}", file=sys.stderr)
        elif r.error and not r.verified:
            print(f"kerrickpt: refused: {r.path}: {r.error}", file=sys.stderr)
        elif r.path in broken:
            print(f"kerrickpt: unusable: {broken[r.path]}", file=sys.stderr)
        elif not args.json:
            print(f"ok {r.name} {r.id}" + (f" ({layerchain.describe(r)})" if r.base else ""))
    code = ArchiveCorruptError.exit_code if any(r.corrupt or (r.error and not r.verified) for r in rows) else 0
    return _snapshot_rows(rows, broken), code


def _log_tail_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-tail",
        type=_log_size,
        default=logtail.DEFAULT_BYTES,
        metavar="SIZE",
        help="carry only the container log's last SIZE bytes, e.g. 8M (default 8M; older lines stay behind)",
    )


def _log_size(text: str) -> int:
    try:
        return cgroups.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _keep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-last", type=int, default=0, metavar="N", help="keep the N newest snapshots")
    for rule, (unit, _) in retention.PERIODS.items():
        p.add_argument(
            f"--keep-{rule}",
            type=int,
            default=0,
            metavar="N",
            help=f"keep the newest snapshot of each of the N most recent {unit}s that have one",
        )


def _exec_options() -> argparse.ArgumentParser:
    p = _Parser(prog="kerrickpt exec", add_help=False)
    p.add_argument("--user", metavar="NAME|UID[:GROUP|GID]", help="run as this user of the container")
    p.add_argument("--workdir", metavar="DIR", help="working directory inside (default: the container's)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="set an environment variable")
    return p


class _Parser(argparse.ArgumentParser):
    """Bad arguments raise UsageError, so that `main` reports them like any error (and as JSON with --json)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().rstrip()}")


def _run_options(p: argparse.ArgumentParser) -> None:
    """The container options of `run` (and `job`), and its command."""
    p.add_argument("--memory-limit", metavar="SIZE", help="cgroup memory limit, e.g. 512M or 2G")
    p.add_argument(
        "--rootfs",
        metavar="DIR|host",
        help="a root of its own: an overlay of DIR (or of this node's root: host) and a writable layer that "
        "checkpoints carry; also its own user and mount namespaces (default: share the node's)",
    )
    p.add_argument("--user", metavar="NAME|UID[:GID]", help="with --rootfs: run the command as this user inside")
    p.add_argument(
        "--volume", action="append", default=[], metavar="SRC:DST[:ro]", help="with --rootfs: bind a host path"
    )
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="with --rootfs: set a variable")
    p.add_argument("--workdir", metavar="DIR", help="with --rootfs: the command's working directory")
    p.add_argument(
        "--ids",
        choices=ID_MODES,
        help="with --rootfs: a host id range of its own (own, the default), or that range but for the uid and groups "
        "of --user, which keep the host's ids (host: files on volumes belong to their user; its root and volumes "
        "are nosuid)",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")


def build_parser() -> argparse.ArgumentParser:
    located = _Parser(add_help=False)
    located.add_argument(
        "--state-dir",
        help=f"where containers are recorded (default: ${containers.STATE_ENV} or {containers.DEFAULT_STATE_DIR})",
    )
    common = _Parser(add_help=False, parents=[located])
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress line on a terminal (snapshot: nothing at all on success)",
    )
    keyed = _Parser(add_help=False)  # commands that seal or open encrypted archives and stores
    keyed.add_argument(
        "--key-file",
        metavar="FILE",
        help=f"the key (`kerrickpt key create`; default ${KEY_FILE_ENV}); a passphrase it is under is read from "
        f"${PASSPHRASE_ENV} or asked on the terminal",
    )
    in_store = _Parser(add_help=False)
    in_store.add_argument("--store", required=True, metavar="DIR", help="the snapshot store (an existing directory)")
    waiting = _Parser(add_help=False)
    waiting.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for a container's lock (default 0)"
    )
    parser = _Parser(
        prog="kerrickpt",
        description="Checkpoint and restore Linux containers and process trees with CRIU.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    Handler = Callable[[argparse.Namespace], tuple[Any, int]]

    def add(name: str, func: Handler, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common, *parents], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("check", cmd_check, "can this node checkpoint and restore? (exit 0 only when ready)", keyed)
    p.add_argument("--against", metavar="FILE", help="instead: could this node restore this archive?")
    p.add_argument("--force", action="store_true", help="with --against: accept errors that --force accepts")
    p = add("run", cmd_run, "start a checkpointable container (new PID, IPC and UTS namespaces, own cgroup)")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--net",
        choices=network.MODES,
        default=network.HOST,
        help="host: share this node's network (the default); own: a network namespace of its own, with "
        "loopback and one interface on the node's bridge (see README, Network)",
    )
    p.add_argument(
        "--ip",
        metavar="ADDR/PREFIX",
        help="with --net own: this address in the node's subnet (default: the node's pool's first free one)",
    )
    p.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="HOSTPORT:PORT[/tcp|udp]",
        help="with --net own: forward this node port to the container's port (repeatable)",
    )
    _run_options(p)
    add("ps", cmd_ps, "list this node's containers")

    def add_plain(
        name: str, func: Handler, help_text: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        """A command whose output is the container's own: no --json, no progress."""
        p = sub.add_parser(name, parents=[located, *parents], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add_plain(
        "exec",
        cmd_exec,
        "run a command inside a running container (its namespaces, cgroup, user and root) on this terminal; "
        "exits with the command's exit code",
        _exec_options(),
    )
    p.add_argument("name")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    p = add_plain(
        "job",
        cmd_job,
        "run a batch job's container in the foreground: resumed from its checkpoint in DIR, or started; "
        f"checkpointed on SIGTERM (Slurm's requeue; not scancel) or --signal, then exit {REQUEUE_EXIT}",
    )
    p.add_argument("--name", required=True, help="the job's name: its checkpoint is DIR/NAME.kckpt")
    p.add_argument(
        "--dir",
        metavar="DIR",
        help="where its checkpoint is kept, on storage the nodes share (root only; default and for users: "
        "the site's directory, see /etc/kerrickpt/jobs.toml)",
    )
    p.add_argument(
        "--signal", default="TERM", metavar="SIG", help="also checkpoint and stop on this signal (e.g. USR1)"
    )
    p.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="time for the final checkpoint (default: Slurm's GraceTime, or KillWait after SIGTERM; else 60)",
    )
    p.add_argument("--every", metavar="DURATION", help="also checkpoint every DURATION while it runs (e.g. 30m)")
    p.add_argument("--keep", action="store_true", help="keep its checkpoint when the command ends by itself")
    p.add_argument("--events", metavar="PATH|fd:N", help="append one JSON object per line for each event there")
    p.add_argument("--level", type=int, default=kerrickpt.CHECKPOINT_LEVEL, help="zstd level (default %(default)s)")
    _run_options(p)
    p = add_plain("logs", cmd_logs, "print a container's output (its log file)")
    p.add_argument("-f", "--follow", action="store_true", help="then follow it until the container ends")
    p.add_argument("name")
    p = add("kill", cmd_kill, "end a container and remove its cgroups and state")
    p.add_argument("name")
    p = add("gc", cmd_gc, "remove what kerrickpt processes that died left: unregistered names, images, markers")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p = add(
        "checkpoint", cmd_checkpoint, "freeze, dump and archive a container, then stop it (or leave it running)", keyed
    )
    p.add_argument("name", nargs="?", help="a container started by kerrickpt")
    p.add_argument("--cgroup", metavar="PATH", help="instead of NAME: a cgroup kerrickpt did not create")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the archive to write (must not exist)")
    p.add_argument("--leave-running", action="store_true", help="thaw the container after the dump")
    p.add_argument("--level", type=int, default=kerrickpt.CHECKPOINT_LEVEL, help="zstd level (default %(default)s)")
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt and authenticate the archive with the key of --key-file (see README, Encryption)",
    )
    _log_tail_option(p)
    p = add("restore", cmd_restore, "verify an archive and restore its container on this node", keyed)
    p.add_argument("archive", metavar="FILE|NAME", help="an archive; with --store, a container's name")
    p.add_argument("--name", help="restore under this name (default: the name it was checkpointed under)")
    p.add_argument("--force", action="store_true", help="accept compatibility errors that are not fatal")
    p.add_argument(
        "--pid-namespace",
        choices=["new", "host"],
        default="new",
        help="for a job that shared the host's namespaces: back at its PIDs in a new PID namespace (default), "
        "or in the host's, if its PIDs are free there",
    )
    p.add_argument(
        "--tcp-close",
        action="store_true",
        help="for a container with its own network: restore its established TCP connections closed (a copy "
        "next to a source that still runs; it takes another address if its own is in use)",
    )
    p.add_argument("--store", metavar="DIR", help="restore NAME's latest snapshot in this store (or the one --at)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--at", metavar="TIME", help="the newest snapshot taken at or before TIME (ISO 8601 or an id)")
    pick.add_argument("--latest", action="store_true", help="the newest snapshot (the default)")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="with --store: may pick a snapshot whose checksums no run has checked (one copied in)",
    )
    p = add("inspect", cmd_inspect, "show what an archive holds (an encrypted one's only with its key)", keyed)
    p.add_argument("archive")
    p = add("migrate", cmd_migrate, "move a running container to another node over ssh, exactly once")
    p.add_argument("name")
    p.add_argument("--to", required=True, metavar="[USER@]HOST[:PORT]")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPT", help="passed to ssh as -o OPT")
    p.add_argument("--remote-kerrickpt", default="kerrickpt", metavar="PATH", help="kerrickpt on the target")
    p.add_argument("--force", action="store_true", help="accept compatibility errors that are not fatal")
    p.add_argument("--attempts", type=int, default=DEFAULT_ATTEMPTS, help="tries for transient failures")
    p.add_argument("--level", type=int, help="zstd level (default: chosen from the link's measured speed)")
    _log_tail_option(p)
    p.add_argument(
        "--lazy",
        action="store_true",
        help="post-copy: the container runs on the target before its memory has all arrived (see README: "
        "if the page transfer breaks off, the target's copy is killed and this one resumes from the freeze)",
    )
    p.add_argument(
        "--net-remap",
        action="store_true",
        help="a container with a network of its own gets an address of the target's (its TCP connections are "
        "closed, its listeners kept): for a target whose network is not one segment with this node's",
    )
    p = sub.add_parser("key", help="make a key file for encrypted archives and stores")
    key_actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = key_actions.add_parser(
        "create",
        parents=[common],
        help="write a new random key to FILE (0600, never over an existing file)",
        description="write a new random key to FILE (0600, never over an existing file); back it up: what it "
        "seals cannot be read without it",
    )
    q.set_defaults(func=cmd_key_create)
    q.add_argument("file", type=Path, metavar="FILE")
    q.add_argument(
        "--passphrase",
        action="store_true",
        help=f"keep the key under a passphrase (scrypt), from ${PASSPHRASE_ENV} or asked twice on the terminal",
    )
    p = add("recover", cmd_recover, "finish a migration whose outcome is unknown, by asking the target")
    p.add_argument("name")
    p.add_argument("--attempts", type=int, default=DEFAULT_ATTEMPTS, help="tries for transient failures")
    p = sub.add_parser("agent", parents=[common])  # the remote end of migrate/recover; not for people
    p.set_defaults(func=cmd_agent)
    p.add_argument("op", choices=["preflight", "receive", "pages", "sink", "status", "reap"])
    p.add_argument("--name")
    p.add_argument("--migration-id")
    p.add_argument("--force", action="store_true")
    p.add_argument("--lazy", action="store_true")
    p.add_argument("--net-remap", action="store_true")
    p.add_argument("--hold", action="store_true")  # preflight: hold its claims until the source closes
    p.add_argument("--reserved", action="store_true")  # receive: a held pre-flight claimed for it

    p = sub.add_parser(
        "snapshot",
        parents=[common, in_store, waiting, keyed],
        help="checkpoint a running container into a snapshot store, then prune (made for cron)",
        description="Checkpoint a container into a snapshot store and leave it running, then prune by the "
        "--keep-* rules. Quiet on stdout; one log line on stderr per run (none on success with --quiet).",
    )
    p.set_defaults(func=cmd_snapshot)
    p.add_argument("name", nargs="?", help="a container started by kerrickpt")
    p.add_argument("--cgroup", metavar="PATH", help="instead of NAME: a cgroup kerrickpt did not create")
    _keep_options(p)
    p.add_argument("--level", type=int, default=kerrickpt.DEFAULT_LEVEL, help="zstd level (default %(default)s)")
    _log_tail_option(p)
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="refuse to snapshot unless the store is encrypted (`snapshots init --encrypt`); its key: --key-file",
    )

    p = sub.add_parser("snapshots", help="list, prune or verify the snapshots in a store")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def act(name: str, func: Handler, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        q = actions.add_parser(name, parents=[common, in_store, *parents], help=help_text, description=help_text)
        q.set_defaults(func=func)
        q.add_argument("name", nargs="?", help="only this container's snapshots")
        return q

    q = actions.add_parser(
        "init",
        parents=[common, in_store, keyed],
        help="make an empty store deduplicating: its snapshots share what they hold alike",
        description="make an empty store deduplicating: its snapshots share what they hold alike; with --encrypt, "
        "sealed with the key of --key-file (see README, Encrypted stores)",
    )
    q.set_defaults(func=cmd_snapshots_init)
    q.add_argument("--encrypt", action="store_true", help="encrypt and authenticate everything it keeps (--key-file)")
    act(
        "list",
        cmd_snapshots_list,
        "list snapshots: time, size, frozen time, source node, key id if encrypted (no key needed), verified or not",
    )
    q = act("prune", cmd_snapshots_prune, "remove the snapshots no --keep-* rule keeps, saying why", keyed, waiting)
    _keep_options(q)
    q.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    act("verify", cmd_snapshots_verify, "check every archive's checksums (exit 6 if any is corrupt)", keyed, waiting)
    return parser


@contextlib.contextmanager
def unwinding_on(signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """Make SIGHUP (a closed terminal), SIGINT and SIGTERM unwind like Ctrl-C: a frozen container is
    thawed, scratch and nodes removed; the command then exits 128+N. A repeat is ignored, so that
    the unwinding it would cut short finishes. The caller's handlers come back afterwards."""

    def interrupted(signum: int, _frame: object) -> None:
        for other in signals:
            signal.signal(other, signal.SIG_IGN)
        raise Interrupted(signum)

    with _handling(set(signals), interrupted):
        yield


UNWINDING = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)


def _fail(error: KerrickptError, command: str | None, as_json: bool) -> int:
    """Report an error: one line (and CRIU's log tail) on stderr, the error object on stdout with --json."""
    # The exit code in the text too: cron mails what a job prints, not how it ended.
    print(f"kerrickpt: error (exit {error.exit_code}): {error}", file=sys.stderr)
    if command == "agent":
        transport.emit(sys.stdout, "error", **error.to_dict())
    elif as_json:
        print(json.dumps(error.to_dict(), indent=2, default=str))
    return error.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(exc, None, as_json)
    as_json = getattr(args, "json", False)  # exec and logs have none: their output is the container's
    logging.basicConfig(level=logging.WARNING, format="kerrickpt: %(message)s")
    # A scheduler's SIGTERM or a closed terminal must not leave a container frozen. The agent keeps
    # SIGHUP's default: ssh hangs up on it when the source goes, and the source decides what follows.
    try:
        with unwinding_on(UNWINDING if args.command != "agent" else (signal.SIGINT, signal.SIGTERM)):
            result, code = args.func(args)
    except KerrickptError as exc:
        return _fail(exc, args.command, as_json)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(HostError(f"{exc.strerror or exc}{where}"), args.command, as_json)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        print(f"kerrickpt: interrupted by {name} (exit {128 + signum})", file=sys.stderr)
        if as_json and args.command != "agent":
            error = {"error": "Interrupted", "message": f"interrupted by {name}", "exit_code": 128 + signum}
            print(json.dumps(error, indent=2))
        return 128 + signum
    if as_json and args.command != "agent":
        print(json.dumps(result, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
