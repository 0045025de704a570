"""`bench/run`: measure kerrickpt against raw CRIU, the sequential export pipeline, runc and DMTCP, in one run.

Sizes outermost (so one size's memory is freed before the next), then repetitions, then
kinds, and within each the cases in turn: baselines and kerrickpt interleave, so a slow
moment of the machine hits all of them alike. Each size starts with a warm-up repetition,
run as the others but not counted: the first run of a case at a size pays what the next
ones do not (page cache, memory the VM has not backed yet).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.cases import CONNECTIONS, DEDUP_SNAPSHOTS, DEFAULT, NAMES, Repeat, plan
from bench.lab import BenchError, Lab, run
from bench.picture import draw
from bench.report import Results
from kerrickpt import cgroups, command, criu
from kerrickpt.cli.main import unwinding_on
from kerrickpt.errors import Interrupted

KINDS = ("heap", "mixed")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--sizes", default="256M,1G,4G", help="memory sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="workload kinds: heap, mixed (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every case (default: %(default)s)")
    extra = ", ".join(name for name in NAMES if name not in DEFAULT)
    parser.add_argument("--cases", default=",".join(DEFAULT), help=f"cases to run (default: %(default)s; "
                        f"also: {extra})")  # fmt: skip
    parser.add_argument("--layers", default="0,64M,512M", help="what the confined cases write into their layer "
                        "before the checkpoint, comma-separated (default: %(default)s)")  # fmt: skip
    parser.add_argument("--snapshots", type=int, default=20, help="snapshots in a row of the repeated case "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between the repeated case's snapshots "
                        "(default: %(default)s, back to back)")  # fmt: skip
    parser.add_argument("--repeat-at", default="1G", help="the sizes the repeated case runs at, among --sizes, "
                        "comma-separated (default: %(default)s)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=CONNECTIONS, help="established TCP connections the "
                        "netmigrate case's container holds (default: %(default)s)")  # fmt: skip
    parser.add_argument("--dedup-snapshots", type=int, default=DEDUP_SNAPSHOTS, help="snapshots in a row the dedup "
                        "case takes into each of its stores (default: %(default)s)")  # fmt: skip
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="a warm-up repetition, not counted, before each size's (default: on)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"),
                        help="where to write the JSON; the picture goes beside it, as .png")  # fmt: skip
    args = parser.parse_args(argv)
    args.sizes = [cgroups.parse_size(s) // 2**20 for s in args.sizes.split(",")]
    args.repeat_at = [cgroups.parse_size(s) // 2**20 for s in args.repeat_at.split(",")]
    args.kinds = args.kinds.split(",")
    args.cases = args.cases.split(",")
    args.layers = [cgroups.parse_size(s) // 2**20 for s in args.layers.split(",")]
    for value, known, what in ((args.kinds, KINDS, "kind"), (args.cases, NAMES, "case")):
        if unknown := [v for v in value if v not in known]:
            parser.error(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    if min(args.reps, *args.sizes, args.snapshots, args.connections, args.dedup_snapshots) < 1:
        parser.error("--reps, --snapshots, --connections, --dedup-snapshots and every size must be at least 1 (MiB)")
    if args.pause < 0:
        parser.error("--pause cannot be negative")
    if "repeated" in args.cases and (absent := [m for m in args.repeat_at if m not in args.sizes]):
        parser.error(f"--repeat-at {', '.join(f'{m}M' for m in absent)} is not among --sizes: "
                     "give sizes of the run, or leave `repeated` out of --cases")  # fmt: skip
    if min(args.layers) < 0:
        parser.error("a layer size cannot be negative")
    return args


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory_gib": f"{int(Path('/proc/meminfo').read_text().split()[1]) / 2**20:.1f}",
        "kernel": platform.release(),
        "debian": Path("/etc/debian_version").read_text().strip(),
        "criu": criu.locate().version,
    }


def main(argv: list[str]) -> int:
    try:
        with unwinding_on((signal.SIGTERM,)):  # so the lab removes its nodes, containers and tmpfs
            return measure(parse_args(argv), argv)
    except Interrupted as exc:
        return exc.exit_code


def measure(args: argparse.Namespace, argv: list[str]) -> int:
    results = Results()
    started = time.monotonic()
    try:
        with Lab() as lab:
            for mib in args.sizes:
                repeat = Repeat(args.snapshots, args.pause) if mib in args.repeat_at else None
                steps = plan(args.cases, args.layers, repeat, args.connections, args.dedup_snapshots)
                for rep in range(0 if args.warmup else 1, args.reps + 1):
                    for kind in args.kinds:
                        for step, case in steps:
                            # Writeback of an earlier case must not land in this one's numbers.
                            run(["sync"], timeout=300)
                            which = f"rep {rep}" if rep else "warm-up"
                            print(f"[{time.monotonic() - started:7.1f} s] {mib} MiB {kind} {which}: {step}",
                                  file=sys.stderr, flush=True)  # fmt: skip
                            outcome = case(lab, mib, kind)
                            results.add(mib, kind, rep, outcome.metrics, outcome.verified, outcome.series,
                                        warmup=rep == 0)  # fmt: skip
    except (BenchError, command.CommandTimeout, subprocess.TimeoutExpired) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    config: dict[str, Any] = {"sizes_mib": args.sizes, "kinds": args.kinds, "reps": args.reps, "cases": args.cases,
                              "layers_mib": args.layers, "snapshots": args.snapshots, "pause_s": args.pause,
                              "repeat_at_mib": args.repeat_at, "connections": args.connections,
                              "dedup_snapshots": args.dedup_snapshots,
                              "warmup": args.warmup, "command": " ".join(["bench/run", *argv])}  # fmt: skip
    report = results.to_dict(machine(), config)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    picture = args.json.with_suffix(".png")
    draw(report, picture)
    print(results.table())
    print(f"\nmachine: {json.dumps(report['machine'])}\nJSON: {args.json}\npicture: {picture}")
    return 0 if all(c["ok"] for c in results.checks) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
