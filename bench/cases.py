"""The measured cases: the baselines (raw CRIU, the sequential export pipeline, runc, DMTCP) and kerrickpt's commands.

Each case starts its own workload, measures, checks the workload's memory after every
restore, and removes what it made. It returns metrics named `<case>.<what>`:
seconds end in `_s`, sizes and memory in `_mib`. The confined cases run once per layer
size; their metrics are named `conf.L<layer MiB>.<what>`. Every file a case writes (images,
archives, the store, the nodes' state and scratch) is on the lab's one tmpfs.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import dedup, engines, preemption
from bench.lab import MIB, Lab, json_of, kerrickpt, pipe_max_size, removed, run, shell, timeout_for
from kerrickpt import keys
from kerrickpt.node import LAZY_PIPE_SIZE


@dataclass
class Outcome:
    metrics: dict[str, float] = field(default_factory=dict)
    verified: dict[str, bool] = field(default_factory=dict)  # restore -> the workload's memory was intact
    series: dict[str, list[float]] = field(default_factory=dict)  # metrics a case measures many times in one run


def raw(lab: Lab, mib: int, kind: str) -> Outcome:
    """`criu dump` to tmpfs, `criu restore` from it: the floor every other case is measured against."""
    job = lab.start(mib, kind)
    with removed(job.node, job.name), lab.scratch("raw") as images:
        dumped = lab.criu_dump(job, images, mib)
        restore_s, pid = lab.criu_restore(job, images, mib)
        ok = job.moved(job.node, job.name, pid).verify(mib)
    return Outcome(
        {
            "raw.dump_s": dumped["dump_s"],
            "raw.frozen_s": dumped["frozen_s"],
            "raw.restore_s": restore_s,
            "raw.downtime_s": dumped["dump_s"] + restore_s,
        },
        {"raw.restore": ok},
    )


def sequential(lab: Lab, mib: int, kind: str) -> Outcome:
    """What `podman container checkpoint --export --compress=zstd` and scripts around runc do, step by step."""
    job = lab.start(mib, kind)
    limit = timeout_for(mib)
    with removed(job.node, job.name), lab.scratch("seq") as work:
        images, copied, unpacked = work / "images", work / "copy", work / "unpacked"
        for path in (images, copied, unpacked):
            path.mkdir()
        archive = work / "export.tar.zst"
        phases = {"dump_s": lab.criu_dump(job, images, mib)["dump_s"]}
        phases["compress_s"] = shell(f"tar -C {images} -cf - . | zstd -3 -T0 -q -o {archive}", timeout=limit)
        phases["copy_s"] = run(["cp", str(archive), str(copied)], timeout=limit)
        phases["unpack_s"] = shell(f"zstd -dc -q {copied / archive.name} | tar -C {unpacked} -xf -", timeout=limit)
        phases["restore_s"], pid = lab.criu_restore(job, unpacked, mib)
        ok = job.moved(job.node, job.name, pid).verify(mib)
        size = archive.stat().st_size / MIB
    metrics = {f"seq.{k}": v for k, v in phases.items()}
    metrics["seq.downtime_s"] = sum(phases.values())
    metrics["seq.export_s"] = phases["dump_s"] + phases["compress_s"]
    metrics["seq.unpack_restore_s"] = phases["unpack_s"] + phases["restore_s"]
    metrics["seq.archive_mib"] = size
    return Outcome(metrics, {"seq.restore": ok})


def snapshot(lab: Lab, mib: int, kind: str) -> Outcome:
    """`kerrickpt checkpoint --leave-running`: how long the container is frozen for a copy."""
    job = lab.start(mib, kind)
    with removed(job.node, job.name), lab.scratch("snap") as work:
        answer, wall, peak = kerrickpt(
            job.node, "checkpoint", job.name, "-o", str(work / "snap.kckpt"), "--leave-running",
            timeout=timeout_for(mib),
        )  # fmt: skip
        ok = job.verify(mib)
    return Outcome(
        {
            "kpt.snapshot_frozen_s": answer["timings"]["frozen_s"],
            "kpt.snapshot_s": wall,
            "kpt.snapshot_peak_mib": peak,
        },
        {"kpt.snapshot (left running)": ok},
    )


@dataclass(frozen=True)
class Repeat:
    """How the repeated case runs: `count` snapshots, `pause` seconds between them (cron's minutes, shortened)."""

    count: int
    pause: float = 0.0


def repeated(lab: Lab, mib: int, kind: str, repeat: Repeat) -> Outcome:
    """`kerrickpt snapshot` again and again into a store that keeps the last one: each one's frozen window."""
    job = lab.start(mib, kind)
    frozen, walls = [], []
    with removed(job.node, job.name), lab.scratch("store") as store:
        started = time.monotonic()
        for n in range(repeat.count):
            if n:
                time.sleep(repeat.pause)
            answer, wall, _peak = kerrickpt(
                job.node, "snapshot", job.name, "--store", str(store), "--keep-last", "1", timeout=timeout_for(mib)
            )
            frozen.append(answer["snapshot"]["frozen_s"])
            walls.append(wall)
        total = time.monotonic() - started
        ok = job.verify(mib)
    return Outcome(
        {"kpt.repeated_total_s": total},
        {"kpt.repeated (left running)": ok},
        {"kpt.repeated_frozen_s": frozen, "kpt.repeated_snapshot_s": walls},
    )


def prefix(layer_mib: int | None) -> str:
    """What a case's metrics start with: `kpt` for plain containers, `conf.L<MiB>` for confined ones."""
    return "kpt" if layer_mib is None else f"conf.L{layer_mib}"


def checkpoint(lab: Lab, mib: int, kind: str, layer_mib: int | None = None, *, encrypted: bool = False) -> Outcome:
    """`kerrickpt checkpoint` end to end, then `kerrickpt restore` of that archive on the same node; `encrypted`,
    with a key file (metrics `sealed.*`)."""
    job = lab.start(mib, kind, layer_mib)
    node = job.node
    copy = f"{job.name}-r"
    limit = timeout_for(mib + (layer_mib or 0))
    at = "sealed" if encrypted else prefix(layer_mib)
    with removed(node, job.name), removed(node, copy), lab.scratch("ckpt") as work:
        archive = work / "ckpt.kckpt"
        keyed, sealing = [], []
        if encrypted:
            keys.create(work / "key")
            keyed = ["--key-file", str(work / "key")]
            sealing = ["--encrypt", *keyed]
        taken, checkpoint_s, ckpt_peak = kerrickpt(
            node, "checkpoint", job.name, "-o", str(archive), *sealing, timeout=limit
        )
        restored, restore_s, restore_peak = kerrickpt(
            node, "restore", str(archive), "--name", copy, *keyed, timeout=limit
        )
        ok = job.moved(node, copy, int(restored["init_pid"])).verify(mib)
        layer = {}
        if layer_mib is not None:  # the layer as the archive carries it: a tar, before compression
            layer[f"{at}.layer_tar_mib"] = json_of(node, "inspect", str(archive))["layer_bytes"] / MIB
    timings = taken["timings"]
    return Outcome(
        {
            f"{at}.checkpoint_s": checkpoint_s,
            f"{at}.checkpoint_dump_s": timings["dump_s"],
            f"{at}.checkpoint_compress_s": timings["compress_s"],
            f"{at}.archive_mib": taken["archive_bytes"] / MIB,
            f"{at}.checkpoint_peak_mib": ckpt_peak,
            f"{at}.restore_s": restore_s,
            f"{at}.restore_peak_mib": restore_peak,
            f"{at}.downtime_s": checkpoint_s + restore_s,  # on one node, as raw's and runc's
            **layer,
        },
        {f"{at}.restore": ok},
    )


def sealed(lab: Lab, mib: int, kind: str) -> Outcome:
    """`checkpoint --encrypt` and `restore` with its key: what encryption costs over `checkpoint` (issue 16)."""
    return checkpoint(lab, mib, kind, encrypted=True)


def migrate(lab: Lab, mib: int, kind: str, layer_mib: int | None = None, *, lazy: bool = False) -> Outcome:
    """`kerrickpt migrate` from node a to node b over ssh: downtime is freeze to running on b."""
    job = lab.start(mib, kind, layer_mib)
    source, target = lab.nodes
    assert lab.cluster is not None
    case = f"{prefix(layer_mib)}.migrate_lazy" if lazy else f"{prefix(layer_mib)}.migrate"
    with removed(source, job.name), removed(target, job.name):
        moved, wall, peak = kerrickpt(
            source, "migrate", job.name, *lab.cluster.migrate_args(target), *(["--lazy"] if lazy else []),
            timeout=2 * timeout_for(mib + (layer_mib or 0)),
        )  # fmt: skip
        ok = job.moved(target, job.name, int(moved["pid_map"]["1"])).verify(mib)
    return Outcome({f"{case}_downtime_s": moved["downtime_s"], f"{case}_s": wall, f"{case}_peak_mib": peak}, {case: ok})


def migrate_lazy(lab: Lab, mib: int, kind: str) -> Outcome:
    """`kerrickpt migrate --lazy` (post-copy): downtime is freeze to running on b, before all memory came."""
    with pipe_max_size(LAZY_PIPE_SIZE):  # what CRIU's lazy pages need here (root lacks CAP_SYS_RESOURCE)
        return migrate(lab, mib, kind, lazy=True)


CONNECTIONS = 100  # the netmigrate case's established connections, by default (bench/run --connections)


def netmigrate(lab: Lab, mib: int, kind: str, connections: int = CONNECTIONS) -> Outcome:
    """`migrate` of a container with a network of its own (bench/echo.py's server, holding `mib` MiB of random bytes
    whatever the kind) from node a to node b with `connections` established TCP connections from a machine of their
    segment, each asking every 100 ms, right after the same container with none: downtime, the network lock (cut
    off to connected on b), each client's longest wait between two answers, and that every answer came, in turn."""
    idle, idle_ok, _ = _migrate_echo(lab, mib, 0)
    busy, busy_ok, report = _migrate_echo(lab, mib, connections)
    gaps = report["longest_gap_s"]
    return Outcome(
        {
            "net.idle_downtime_s": idle["downtime_s"],
            "net.downtime_s": busy["downtime_s"],
            "net.added_downtime_s": busy["downtime_s"] - idle["downtime_s"],
            "net.idle_network_lock_s": idle["timings"]["network_lock_s"],
            "net.network_lock_s": busy["timings"]["network_lock_s"],
            "net.longest_gap_s": max(gaps),
            "net.median_longest_gap_s": statistics.median(gaps),
        },
        {"net.migrate (no connections)": idle_ok, f"net.migrate ({connections} connections, every answer)": busy_ok},
    )


def _migrate_echo(lab: Lab, mib: int, connections: int) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """Migrate the echo server from node a to node b with `connections` clients talking to it: kerrickpt's answer,
    whether its memory and (with clients) every answer they got was right, and the clients' report."""
    job = lab.start_echo(mib)
    source, target = lab.nodes
    assert lab.cluster is not None and job.address is not None
    ip = job.address.split("/")[0]
    with removed(source, job.name), removed(target, job.name), contextlib.ExitStack() as stack:
        clients = stack.enter_context(lab.echo_clients(ip, connections)) if connections else None
        moved, _wall, _peak = kerrickpt(
            source, "migrate", job.name, *lab.cluster.migrate_args(target), timeout=2 * timeout_for(mib)
        )
        ok = job.moved(target, job.name, int(moved["pid_map"]["1"])).verify(mib)
        report = clients.finish() if clients else {"longest_gap_s": [], "error": ""}
    if report["error"]:
        print(f"bench: netmigrate: {report['error']}", file=sys.stderr)
    return moved, ok and not report["error"], report


def runc(lab: Lab, mib: int, kind: str) -> Outcome:
    """`runc checkpoint` and `runc restore` of a busybox container running the workload, with the project's CRIU."""
    limit = timeout_for(mib)
    with lab.runc_container(mib, kind) as job, lab.scratch("runc-images") as work:
        images = str(work / "images")
        checkpoint_s = job.runc("checkpoint", "--image-path", images, "--work-path", str(work / "dump"), job.name,
                                timeout=limit)  # fmt: skip
        restore_s = job.runc("restore", "--detach", "--image-path", images, "--work-path", str(work / "restore"),
                             "--bundle", str(job.bundle), job.name, timeout=limit)  # fmt: skip
        ok = job.verify(mib)
    metrics = {
        "runc.checkpoint_s": checkpoint_s,
        "runc.restore_s": restore_s,
        "runc.downtime_s": checkpoint_s + restore_s,
    }
    return Outcome(metrics, {"runc.restore": ok})


def confined(lab: Lab, mib: int, kind: str, layer_mib: int) -> Outcome:
    """`checkpoint` and `restore` of the workload in a `--rootfs host` container that wrote `layer_mib` MiB into its
    layer (data of the workload's kind, see memload.c) before filling its memory."""
    return checkpoint(lab, mib, kind, layer_mib)


def confined_migrate(lab: Lab, mib: int, kind: str, layer_mib: int) -> Outcome:
    """`migrate` of that confined container from node a to node b."""
    return migrate(lab, mib, kind, layer_mib)


def dmtcp(lab: Lab, mib: int, kind: str) -> Outcome:
    """DMTCP preempted and requeued: `dmtcp_command --bcheckpoint` (gzip images), all killed, `dmtcp_restart`."""
    return Outcome(*preemption.under_dmtcp(lab, mib, kind))


def job(lab: Lab, mib: int, kind: str) -> Outcome:
    """`kerrickpt job` preempted (SIGTERM, exit 85) and requeued (`kerrickpt job` again on the same directory)."""
    return Outcome(*preemption.under_kerrickpt(lab, mib, kind))


def stores(lab: Lab, mib: int, kind: str) -> Outcome:
    """Snapshots of one container kept in borg and in fixed-chunk stores of our own, against plain archives
    (bench/engines.py, with its defaults: 6 snapshots, 5% of the pages rewritten between them)."""
    return Outcome(*engines.case(lab, mib, kind))


DEDUP_SNAPSHOTS = 24  # the dedup case's snapshots into each store, by default: issue 16's day of hourly ones


def deduplicating(lab: Lab, mib: int, kind: str, snapshots: int = DEDUP_SNAPSHOTS) -> Outcome:
    """`snapshots` snapshots of one container, 5% of its pages rewritten between them, into a store of whole archives,
    a deduplicating store and an encrypted one in turn, then restores from each and from archive files (bench/dedup.py):
    issue 16's targets through kerrickpt's own commands."""
    return Outcome(*dedup.case(lab, mib, kind, snapshots))


CASES: dict[str, Callable[[Lab, int, str], Outcome]] = {
    "raw": raw,
    "sequential": sequential,
    "snapshot": snapshot,
    "checkpoint": checkpoint,
    "sealed": sealed,
    "migrate": migrate,
    "lazy": migrate_lazy,
    "runc": runc,
    "dmtcp": dmtcp,
    "job": job,
    "stores": stores,
    "netmigrate": netmigrate,
}

# The cases run once for each layer size of the run (`--layers`).
LAYERED: dict[str, Callable[[Lab, int, str, int], Outcome]] = {
    "confined": confined,
    "confined_migrate": confined_migrate,
}
REPEATED = "repeated"  # runs only at the sizes of `--repeat-at`, `--snapshots` snapshots `--pause` s apart
DEDUP = "dedup"  # `--dedup-snapshots` snapshots into each of its three stores
NAMES = (*CASES, *LAYERED, REPEATED, DEDUP)
# DMTCP's source lies outside the repository (bench/dmtcp-build): the job case and its baseline run when asked for;
# so does the store case, which needs borg (apt-get install borgbackup), the network's, which issue 15 asked for, and
# the dedup case, some 25 full snapshots of each size and kind.
DEFAULT = tuple(name for name in NAMES if name not in ("dmtcp", "job", "stores", "netmigrate", DEDUP))


def plan(
    cases: list[str], layers: list[int], repeat: Repeat | None = None, connections: int = CONNECTIONS,
    snapshots: int = DEDUP_SNAPSHOTS,
) -> list[tuple[str, Callable[[Lab, int, str], Outcome]]]:  # fmt: skip
    """The steps of one repetition, in the order given: each case, a layered one once per layer size, the repeated
    one as `repeat` says (left out without it: not at this size), netmigrate with `connections`, dedup with
    `snapshots` into each store."""
    steps: list[tuple[str, Callable[[Lab, int, str], Outcome]]] = []
    for case in cases:
        if case == DEDUP:
            steps.append((f"{case} ({snapshots} snapshots into 3 stores)",
                          functools.partial(deduplicating, snapshots=snapshots)))  # fmt: skip
        elif case == "netmigrate":
            talking = functools.partial(netmigrate, connections=connections)
            steps.append((f"{case} ({connections} connections)", talking))
        elif case == REPEATED:
            if repeat:
                label = f"{case} ({repeat.count} snapshots, {repeat.pause:g} s apart)"
                steps.append((label, functools.partial(repeated, repeat=repeat)))
        elif case in LAYERED:
            steps += [(f"{case} layer {n} MiB", functools.partial(LAYERED[case], layer_mib=n)) for n in layers]
        else:
            steps.append((case, CASES[case]))
    return steps
