"""Owns the `dedup` case of bench/run (issue 16): snapshots of one container into a store of whole archives, a
deduplicating store and an encrypted one, through kerrickpt's commands, then restores from each and from archives.

The workload rewrites CHURN_PERCENT% of its pages, one page at a time at random places, between snapshots (memload
`--churn 5 1`). Each of N rounds takes `kerrickpt snapshot NAME --store DIR` into each store in turn, the order
turning with each round so that a slow moment of the machine is shared: `whole`, a store of whole archives (what
every store was before issue 16), `chunks`, made deduplicating by `snapshots init`, and `sealed`, by `snapshots init
--encrypt` with a key file. Each snapshot's frozen window (from its `--json` answer) and wall time are taken, and
every store's size after the round (what `du` counts: the blocks its files take). Then, in as many rounds as it
restores snapshots (the first, the middle and the last), each store restores that snapshot (`restore --store DIR NAME
--at ID`), and the running container is checkpointed into an archive file, plain and `--encrypt`ed (`checkpoint
--leave-running -o`), each restored at once: one restore of each of them per round, the order turning again. Every
restored container's memory is checked against what the workload held when its snapshot was taken, then killed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from bench.lab import CHURN_PERCENT, MIB, Job, Lab, kerrickpt, removed, timeout_for
from kerrickpt import keys

STORES = ("whole", "chunks", "sealed")  # their metrics: dedup.<store>.*
ARCHIVES = ("archive", "sealed_archive")  # a `checkpoint -o` file, plain and encrypted: dedup.<archive>.*

T = TypeVar("T")


def turned(items: Sequence[T], turn: int) -> list[T]:
    """`items` in the order of round `turn`: each round starts one further along, so each takes every place."""
    start = turn % len(items)
    return [*items[start:], *items[:start]]


def picks(snapshots: int) -> list[int]:
    """Which of `snapshots` snapshots (numbered from 0) are restored: the first, the middle and the last."""
    return sorted({0, (snapshots - 1) // 2, snapshots - 1})


def allocated(path: Path) -> int:
    """What `du` counts for `path` and everything under it: the bytes the file system allocated to them."""
    return sum(p.lstat().st_blocks * 512 for p in (path, *path.rglob("*")))


@dataclass
class Taken:
    """What one store's snapshots measured: each one's id, frozen window, wall time and peak memory (kerrickpt's
    processes), and the store's size after each."""

    ids: list[str] = field(default_factory=list)
    frozen_s: list[float] = field(default_factory=list)
    snapshot_s: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    size_bytes: list[int] = field(default_factory=list)


@dataclass
class Measured:
    """Everything the case measured: `taken` per store; per store and archive, each restore's wall time and peak
    memory in the order taken; per archive, each checkpoint's wall time."""

    taken: dict[str, Taken] = field(default_factory=lambda: {name: Taken() for name in STORES})
    restore_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    restore_peak_mib: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    checkpoint_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def metrics(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Its metrics, and its series (many samples of one run), named `dedup.<store or archive>.<what>`.

        One full archive is the store of whole archives after its first snapshot; a store's growth per snapshot is
        what it grew by from its first snapshot to its last over the snapshots after the first, in full archives
        (none with one snapshot); `total_x` is the store after the last, `first_x` after the first.
        """
        full = self.taken["whole"].size_bytes[0]
        values: dict[str, float] = {"dedup.full_archive_mib": full / MIB}
        series: dict[str, list[float]] = {}
        for store, taken in self.taken.items():
            at, sizes = f"dedup.{store}", taken.size_bytes
            values |= {f"{at}.first_x": sizes[0] / full, f"{at}.total_x": sizes[-1] / full,
                       f"{at}.snapshot_peak_mib": max(taken.peak_mib)}  # fmt: skip
            if len(sizes) > 1:
                values[f"{at}.growth_x"] = (sizes[-1] - sizes[0]) / (len(sizes) - 1) / full
            series |= {f"{at}.frozen_s": taken.frozen_s, f"{at}.snapshot_s": taken.snapshot_s,
                       f"{at}.size_mib": [size / MIB for size in sizes]}  # fmt: skip
        for name, walls in self.restore_s.items():
            series[f"dedup.{name}.restore_s"] = walls
            # Issue 16's restore target is for any snapshot: the slowest one restored.
            values[f"dedup.{name}.restore_max_s"] = max(walls)
            values[f"dedup.{name}.restore_peak_mib"] = max(self.restore_peak_mib[name])
        for name, walls in self.checkpoint_s.items():
            series[f"dedup.{name}.checkpoint_s"] = walls
        return values, series


class Run:
    """One run of the case: the workload, its stores and archives under `work`, the key, what was measured."""

    def __init__(self, job: Job, mib: int, work: Path, snapshots: int) -> None:
        self.job, self.mib, self.work, self.snapshots = job, mib, work, snapshots
        self.limit = timeout_for(mib)
        self.key = work / "key"
        self.restored = picks(snapshots)
        self.sums: list[str] = []  # the workload's memory checksum at each round: what a restore of it must hold
        self.freed = 0  # bytes of the store of whole archives removed once measured (see `snapshot_round`)
        self.measured = Measured()
        self.verified: dict[str, bool] = {}
        # Each store's arguments, for `snapshot` and `restore` alike.
        self.where = {name: ["--store", str(work / name)] for name in STORES}
        self.where["sealed"] += ["--key-file", str(self.key)]

    def kerrickpt(self, *args: str) -> tuple[Any, float, float]:
        """`kerrickpt ARGS --json` on the workload's node: its answer, wall time and kerrickpt's peak memory."""
        return kerrickpt(self.job.node, *args, timeout=self.limit)

    def make_stores(self) -> None:
        keys.create(self.key)
        for name, args in self.where.items():
            (self.work / name).mkdir(mode=0o700)
            if name != "whole":  # a store of whole archives is any directory, as every store was before issue 16
                self.kerrickpt("snapshots", "init", *args, *(["--encrypt"] if name == "sealed" else []))

    def snapshot_round(self, index: int) -> None:
        """Churn the workload (not before the first), snapshot it into every store, and measure the stores."""
        if index:
            self.job.churn(self.mib)
        self.sums.append(self.job.expected_sum)
        for name in turned(STORES, index):
            answer, wall, peak = self.kerrickpt("snapshot", self.job.name, *self.where[name])
            taken = self.measured.taken[name]
            taken.ids.append(answer["snapshot"]["id"])
            taken.frozen_s.append(answer["snapshot"]["frozen_s"])
            taken.snapshot_s.append(wall)
            taken.peak_mib.append(peak)
        for name in STORES:
            size = allocated(self.work / name) + (self.freed if name == "whole" else 0)
            self.measured.taken[name].size_bytes.append(size)
        if index not in self.restored:
            # The store of whole archives keeps only the snapshots restored later, and its size is counted as if it
            # kept them all: so the run's tmpfs (memory) need not hold 24 full archives of a 1 GiB `mixed` workload
            # (some 16 GiB) beside the other stores, and no disk's speed enters the numbers. The archive goes first,
            # then its record, as a prune removes them. The other stores keep every snapshot: their size is the point.
            archive = self.work / "whole" / self.job.name / f"{self.measured.taken['whole'].ids[index]}.kckpt"
            meta = archive.with_suffix(".meta")
            self.freed += allocated(archive) + allocated(meta)
            archive.unlink()
            meta.unlink()

    def restore_round(self, turn: int, index: int) -> None:
        """Snapshot `index` restored from every store, and the running workload checkpointed into an archive file,
        plain and encrypted, each restored; every restored copy's memory checked, then killed."""
        for name in turned((*STORES, *ARCHIVES), turn):
            copy = f"{self.job.name}-{name}-{index + 1}"
            keyed = ["--key-file", str(self.key)] if name.startswith("sealed") else []
            with removed(self.job.node, copy):
                if name in STORES:
                    what = f"dedup.{name} restore of snapshot {index + 1} of {self.snapshots}"
                    expected = self.sums[index]
                    at = self.measured.taken[name].ids[index]
                    answer, wall, peak = self.kerrickpt("restore", self.job.name, *self.where[name], "--at", at,
                                                        "--name", copy)  # fmt: skip
                else:
                    what = f"dedup.{name} restore {turn + 1}"
                    expected = self.job.expected_sum
                    path = self.work / f"{name}.kckpt"
                    encrypting = ["--encrypt", *keyed] if keyed else []
                    _, taken_s, _ = self.kerrickpt("checkpoint", self.job.name, "-o", str(path), "--leave-running",
                                                   *encrypting)  # fmt: skip
                    self.measured.checkpoint_s[name].append(taken_s)
                    answer, wall, peak = self.kerrickpt("restore", str(path), "--name", copy, *keyed)
                    path.unlink()
                self.measured.restore_s[name].append(wall)
                self.measured.restore_peak_mib[name].append(peak)
                pid = int(answer["init_pid"])
                copied = replace(self.job.moved(self.job.node, copy, pid), expected_sum=expected)
                self.verified[what] = copied.verify(self.mib)


def case(
    lab: Lab, mib: int, kind: str, snapshots: int
) -> tuple[dict[str, float], dict[str, bool], dict[str, list[float]]]:
    """`snapshots` rounds of snapshots of one churning workload into the three stores, then the restores: metrics,
    memory checks and series (see `Measured.metrics`)."""
    job = lab.start(mib, kind, churn=(CHURN_PERCENT, 1))
    with removed(job.node, job.name), lab.scratch("dedup") as work:
        run = Run(job, mib, work, snapshots)
        run.make_stores()
        for index in range(snapshots):
            run.snapshot_round(index)
        for turn, index in enumerate(run.restored):
            run.restore_round(turn, index)
        run.verified["dedup (the workload after its snapshots and checkpoints)"] = job.verify(mib)
    values, series = run.measured.metrics()
    return values, run.verified, series
