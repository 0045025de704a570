"""Owns the results: samples per size and kind, min, median and max (p95 of repeated snapshots), the dedup case's
stores side by side, the targets of issues 6, 13, 14, 15, 16 and 17, table and JSON."""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.dedup import STORES

PEAK_LIMIT_MIB = 100.0
PEAK_AT_MIB = 4096
LINEAR_FROM_MIB, LINEAR_TO_MIB = 1024, 4096
LINEAR_TOLERANCE = 0.15
# Not post-copy's downtime: it does not grow with memory at all (its pages travel after it).
LINEAR_METRICS = ("kpt.checkpoint_s", "kpt.restore_s", "kpt.migrate_downtime_s")
CONFINED = re.compile(r"^conf\.L(\d+)\.")  # a confined case's metric, and the MiB its layer was given
# What a layer may cost (issue 13): each of these, for a confined container with the layer against one without,
# may grow by no more than the layer's compressed bytes take at the plain container's archive MiB/s for it.
LAYER_PHASES = ("checkpoint_s", "restore_s", "migrate_downtime_s")
LAYER_GOAL = 1.0
# Issue 17: over snapshots in a row, the frozen window's 95th percentile within this many times its median.
REPEATED_FROZEN = "kpt.repeated_frozen_s"
REPEATED_GOAL = 1.5


@dataclass(frozen=True)
class Ratio:
    """A target of issue 6, 13, 14 or 16: median of `metric` at most `goal` times the median of `baseline`."""

    label: str
    metric: str
    baseline: str
    goal: float


RATIOS = (
    Ratio("snapshot frozen window / raw CRIU frozen window", "kpt.snapshot_frozen_s", "raw.frozen_s", 1.15),
    Ratio("checkpoint to archive / dump + tar|zstd -3", "kpt.checkpoint_s", "seq.export_s", 0.5),
    Ratio("archive size / zstd -3 archive size", "kpt.archive_mib", "seq.archive_mib", 1.2),
    Ratio("migration downtime / sequential pipeline downtime", "kpt.migrate_downtime_s", "seq.downtime_s", 0.4),
    Ratio("lazy migration downtime / sequential downtime", "kpt.migrate_lazy_downtime_s", "seq.downtime_s", 0.4),
    Ratio("restore from archive / unpack + restore", "kpt.restore_s", "seq.unpack_restore_s", 0.6),
    # Issue 13: what the mount and user namespaces and the overlay cost on memory-bound work (an empty layer).
    Ratio("confined checkpoint, layer 0 / plain checkpoint", "conf.L0.checkpoint_s", "kpt.checkpoint_s", 1.1),
    Ratio("confined restore, layer 0 / plain restore", "conf.L0.restore_s", "kpt.restore_s", 1.1),
    Ratio("confined migration downtime, layer 0 / plain", "conf.L0.migrate_downtime_s", "kpt.migrate_downtime_s", 1.1),
    # Issue 14: a preempted Slurm job under `kerrickpt job` against the same under DMTCP.
    Ratio("job: preemption signal to checkpoint / DMTCP's", "job.checkpoint_s", "dmtcp.checkpoint_s", 0.5),
    Ratio("job: archive size / DMTCP's gzip image size", "job.archive_mib", "dmtcp.image_mib", 1.2),
    Ratio("job: requeued start to running / dmtcp_restart's", "job.resume_s", "dmtcp.resume_s", 0.5),
    # Issue 16: what encrypting an archive (`checkpoint --encrypt`) and restoring from it cost.
    Ratio("encrypted checkpoint / plain checkpoint", "sealed.checkpoint_s", "kpt.checkpoint_s", 1.15),
    Ratio("restore of an encrypted archive / of a plain one", "sealed.restore_s", "kpt.restore_s", 1.15),
    # Issue 16, the dedup case (bench/dedup.py): snapshots into a deduplicating store (`chunks`) and an encrypted one
    # (`sealed`) against a store of whole archives (`whole`, what every store was before); restores against archives.
    Ratio("dedup store: frozen / whole-archive store's", "dedup.chunks.frozen_s", "dedup.whole.frozen_s", 1.1),
    Ratio("encrypted store: frozen / whole-archive store's", "dedup.sealed.frozen_s", "dedup.whole.frozen_s", 1.1),
    Ratio(
        "dedup store: snapshot run / whole-archive store's", "dedup.chunks.snapshot_s", "dedup.whole.snapshot_s", 0.8
    ),
    # Any of the snapshots: the slowest of those restored, against the archive file's median.
    Ratio(
        "dedup store: slowest restore / archive restore", "dedup.chunks.restore_max_s", "dedup.archive.restore_s", 1.2
    ),
    Ratio("encrypted store: snapshot run / dedup store's", "dedup.sealed.snapshot_s", "dedup.chunks.snapshot_s", 1.15),
    Ratio("encrypted store: restore / dedup store's", "dedup.sealed.restore_s", "dedup.chunks.restore_s", 1.15),
    Ratio(
        "encrypted archive, dedup case: checkpoint / plain",
        "dedup.sealed_archive.checkpoint_s",
        "dedup.archive.checkpoint_s",
        1.15,
    ),
    Ratio(
        "encrypted archive, dedup case: restore / plain",
        "dedup.sealed_archive.restore_s",
        "dedup.archive.restore_s",
        1.15,
    ),
)


@dataclass(frozen=True)
class Limit:
    """A target of issue 15 or 16: the median of `metric` at most `goal` (`unit`: " s" for seconds, "x" a ratio)."""

    label: str
    metric: str
    goal: float
    unit: str = " s"


LIMITS = (
    # Issue 15: what established connections add to a migration's downtime (each run's pair: with them, without).
    Limit("netmigrate: downtime with connections - without, s", "net.added_downtime_s", 0.05),
    # Issue 16: what each snapshot after the first adds to a store, in full archives (see bench/dedup.py).
    Limit("dedup store: grows per snapshot / full archive", "dedup.chunks.growth_x", 0.15, "x"),
    Limit("encrypted store: grows per snapshot / full archive", "dedup.sealed.growth_x", 0.15, "x"),
)


def p95(values: list[float]) -> float:
    """The 95th percentile by nearest rank: the smallest sample that 95% of the samples do not exceed."""
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def spread(values: list[float]) -> dict[str, float]:
    """What the table and the JSON give of every metric's samples."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class Results:
    """Every sample of one run, keyed by (MiB, kind), and every post-restore memory check.

    A warm-up run's samples are not kept: only its memory checks are (a bad restore is bad whenever it happens).
    """

    def __init__(self) -> None:
        self.samples: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.checks: list[dict[str, Any]] = []

    def add(
        self,
        mib: int,
        kind: str,
        rep: int,
        metrics: dict[str, float],
        verified: dict[str, bool],
        series: dict[str, list[float]] | None = None,
        *,
        warmup: bool = False,
    ) -> None:
        """One run of a case: a value per metric, and for `series` (the repeated case) many."""
        for restore, ok in verified.items():
            self.checks.append({"mib": mib, "kind": kind, "rep": rep, "restore": restore, "ok": ok, "warmup": warmup})
        if warmup:
            return
        for name, value in metrics.items():
            self.samples[(mib, kind)][name].append(value)
        for name, values in (series or {}).items():
            self.samples[(mib, kind)][name].extend(values)

    def median(self, mib: int, kind: str, metric: str) -> float | None:
        values = self.samples.get((mib, kind), {}).get(metric)
        return statistics.median(values) if values else None

    def layer_costs(self) -> list[dict[str, Any]]:
        """What each layer added to each of LAYER_PHASES over the confined container without one, against its
        budget: the bytes it added to the archive at the MiB/s the plain container's archive went at in that phase."""
        return [cost for mib, kind in sorted(self.samples) for cost in self._layer_costs(mib, kind)]

    def _layer_costs(self, mib: int, kind: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        layers = sorted({int(m.group(1)) for name in self.samples[(mib, kind)] if (m := CONFINED.match(name))} - {0})
        for layer in layers:
            compressed = self._over_empty_layer(mib, kind, layer, "archive_mib")
            for phase in LAYER_PHASES:
                archive, seconds = self.median(mib, kind, "kpt.archive_mib"), self.median(mib, kind, f"kpt.{phase}")
                speed = archive / seconds if archive and seconds else None
                rows.append({"mib": mib, "kind": kind, "layer_mib": layer, "phase": phase,
                             "layer_tar_mib": self.median(mib, kind, f"conf.L{layer}.layer_tar_mib"),
                             "layer_archive_mib": compressed, "plain_archive_mib_per_s": speed,
                             "extra_s": self._over_empty_layer(mib, kind, layer, phase),
                             "budget_s": compressed / speed if compressed is not None and speed else None})  # fmt: skip
        return rows

    def _over_empty_layer(self, mib: int, kind: str, layer: int, what: str) -> float | None:
        with_layer, empty = self.median(mib, kind, f"conf.L{layer}.{what}"), self.median(mib, kind, f"conf.L0.{what}")
        return None if with_layer is None or empty is None else with_layer - empty

    def targets(self) -> list[dict[str, Any]]:
        """Each target with its measured value and whether it holds (None: not measured in this run)."""
        rows: list[dict[str, Any]] = []
        for mib, kind in sorted(self.samples):
            for ratio in RATIOS:
                num, den = self.median(mib, kind, ratio.metric), self.median(mib, kind, ratio.baseline)
                value = num / den if num is not None and den else None
                rows.append(_row(mib, kind, ratio.label, value, f"<= {ratio.goal}x", value, ratio.goal))
            for limit in LIMITS:
                value = self.median(mib, kind, limit.metric)
                rows.append(_row(mib, kind, limit.label, value, f"<= {limit.goal}{limit.unit}", value, limit.goal))
            for cost in self._layer_costs(mib, kind):
                extra, budget = cost["extra_s"], cost["budget_s"]
                value = extra / budget if extra is not None and budget else None
                label = f"layer {cost['layer_mib']} MiB: added {cost['phase']} / its archive MiB at plain MiB/s"
                rows.append(_row(mib, kind, label, value, f"<= {LAYER_GOAL}x", value, LAYER_GOAL))
            if frozen := self.samples[(mib, kind)].get(REPEATED_FROZEN):
                value = p95(frozen) / statistics.median(frozen)
                label = f"repeated snapshots ({len(frozen)}): frozen window p95 / median"
                rows.append(_row(mib, kind, label, value, f"<= {REPEATED_GOAL}x", value, REPEATED_GOAL))
            peaks = [v for name, vs in self.samples[(mib, kind)].items() if name.endswith("_peak_mib") for v in vs]
            if peaks:
                # The target is set for 4 GiB; smaller sizes show the trend, they cannot meet or miss it.
                judged = max(peaks) if mib == PEAK_AT_MIB else None
                label = f"kerrickpt peak memory, MiB (target at {PEAK_AT_MIB} MiB)"
                rows.append(_row(mib, kind, label, max(peaks), f"<= {PEAK_LIMIT_MIB:.0f}", judged, PEAK_LIMIT_MIB))
        for kind in sorted({k for _, k in self.samples}):
            for metric in LINEAR_METRICS:
                small, big = self.median(LINEAR_FROM_MIB, kind, metric), self.median(LINEAR_TO_MIB, kind, metric)
                if small and big:
                    growth = (big / LINEAR_TO_MIB) / (small / LINEAR_FROM_MIB)
                    holds = abs(growth - 1) <= LINEAR_TOLERANCE
                    label = f"{metric} per GiB at 4 GiB / at 1 GiB"
                    rows.append({"mib": LINEAR_TO_MIB, "kind": kind, "target": label, "value": growth,
                                 "goal": f"1 +- {LINEAR_TOLERANCE}", "holds": holds})  # fmt: skip
        return rows

    def to_dict(self, machine: dict[str, str], config: dict[str, Any]) -> dict[str, Any]:
        results = []
        for (mib, kind), metrics in sorted(self.samples.items()):
            for name, values in sorted(metrics.items()):
                results.append({"mib": mib, "kind": kind, "metric": name, "samples": values, **spread(values),
                                "p95": p95(values)})  # fmt: skip
        return {"machine": machine, "config": config, "results": results, "targets": self.targets(),
                "repeated": self.repeated(), "dedup": self.dedup(), "layer_costs": self.layer_costs(),
                "verified": self.checks}  # fmt: skip

    def repeated(self) -> list[dict[str, Any]]:
        """The frozen windows of the repeated snapshots per size and kind: how many, median, p95 and max."""
        rows = []
        for (mib, kind), metrics in sorted(self.samples.items()):
            if frozen := metrics.get(REPEATED_FROZEN):
                each = spread(frozen)
                rows.append({"mib": mib, "kind": kind, "snapshots": len(frozen), "median": each["median"],
                             "p95": p95(frozen), "max": each["max"], "p95_over_median": p95(frozen) / each["median"],
                             "total_s": self.median(mib, kind, "kpt.repeated_total_s")})  # fmt: skip
        return rows

    def dedup(self) -> list[dict[str, Any]]:
        """The dedup case's stores side by side per size and kind: how many snapshots each took, its growth per
        snapshot and its size after the last (in full archives), the medians of its frozen windows and snapshot runs,
        and its restores' median and slowest."""
        rows = []
        for (mib, kind), metrics in sorted(self.samples.items()):
            for store in STORES:
                at = f"dedup.{store}"
                if frozen := metrics.get(f"{at}.frozen_s"):
                    restores = metrics[f"{at}.restore_s"]
                    rows.append({"mib": mib, "kind": kind, "store": store, "snapshots": len(frozen),
                                 "growth_x": self.median(mib, kind, f"{at}.growth_x"),
                                 "total_x": self.median(mib, kind, f"{at}.total_x"),
                                 "frozen_s": statistics.median(frozen),
                                 "snapshot_s": self.median(mib, kind, f"{at}.snapshot_s"),
                                 "restore_s": statistics.median(restores), "restore_max_s": max(restores)})  # fmt: skip
        return rows

    def table(self) -> str:
        head = f"{'MiB':>5} {'kind':<6} {'metric':<30} {'min':>9} {'median':>9} {'max':>9}"
        lines = [f"{head}  ratio to baseline (median)"]
        baselines = {r.metric: r for r in RATIOS}
        for (mib, kind), metrics in sorted(self.samples.items()):
            for name, values in sorted(metrics.items()):
                ratio = ""
                if name in baselines and (den := self.median(mib, kind, baselines[name].baseline)):
                    ratio = f"{statistics.median(values) / den:.2f}x {baselines[name].baseline}"
                low, mid, high = spread(values).values()
                lines.append(f"{mib:>5} {kind:<6} {name:<30} {low:>9.3f} {mid:>9.3f} {high:>9.3f}  {ratio}")
        lines += _block(REPEATED_HEAD, self.repeated(), _repeated_line)
        lines += _block(DEDUP_HEAD, self.dedup(), _dedup_line)
        lines += _block(COSTS_HEAD, self.layer_costs(), _cost_line)
        targets = self.targets()
        width = max(len(row["target"]) for row in targets)
        head = "target of issue 6, 13 (confined), 14 (job), 15 (network), 16 (encrypted, dedup) or 17 (repeated)"
        lines += ["", f"{'MiB':>5} {'kind':<6} {head:<{width}} {'measured':>9} {'goal':>10}  holds"]
        for row in targets:
            value = "-" if row["value"] is None else f"{row['value']:.2f}"
            holds = {True: "yes", False: "NO", None: "-"}[row["holds"]]
            lines.append(
                f"{row['mib']:>5} {row['kind']:<6} {row['target']:<{width}} {value:>9} {row['goal']:>10}  {holds}"
            )
        bad = [c for c in self.checks if not c["ok"]]
        warmups = sum(c["warmup"] for c in self.checks)
        summary = (
            f"memory verified after {len(self.checks) - len(bad)} of {len(self.checks)} restores "
            f"({warmups} of them in warm-up runs)"
        )
        if bad:
            summary += ": BAD after " + ", ".join(f"{c['restore']} ({c['mib']} MiB {c['kind']})" for c in bad)
        lines += ["", summary]
        return "\n".join(lines)


# The tables below the samples, each with its head and a function making the line of one of its rows.
REPEATED_HEAD = (f"{'MiB':>5} {'kind':<6} {'repeated snapshots':>18} {'frozen median':>13} {'p95':>7} {'max':>7} "
                 f"{'p95/median':>10} {'run s (median)':>14}")  # fmt: skip
DEDUP_HEAD = (f"{'MiB':>5} {'kind':<6} {'dedup store':<11} {'snapshots':>9} {'growth x':>8} {'total x':>7} "
              f"{'frozen s':>8} {'snapshot s':>10} {'restore s':>9} {'slowest':>7}")  # fmt: skip
COSTS_HEAD = (f"{'MiB':>5} {'kind':<6} {'layer':>5} {'phase (medians)':<18} {'tar MiB':>8} {'archive +MiB':>12} "
              f"{'plain MiB/s':>11} {'added s':>8} {'budget s':>8}")  # fmt: skip


def _block(head: str, rows: list[dict[str, Any]], line: Callable[[dict[str, Any]], str]) -> list[str]:
    """A table below the samples: a blank line, `head`, and `line` of each of `rows`; nothing without rows."""
    return ["", head, *map(line, rows)] if rows else []


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _repeated_line(r: dict[str, Any]) -> str:
    return (f"{r['mib']:>5} {r['kind']:<6} {r['snapshots']:>18} {r['median']:>13.3f} {r['p95']:>7.3f} {r['max']:>7.3f} "
            f"{r['p95_over_median']:>10.2f} {_number(r['total_s']):>14}")  # fmt: skip


def _dedup_line(r: dict[str, Any]) -> str:
    growth = "-" if r["growth_x"] is None else f"{r['growth_x']:.3f}"
    return (f"{r['mib']:>5} {r['kind']:<6} {r['store']:<11} {r['snapshots']:>9} {growth:>8} {r['total_x']:>7.2f} "
            f"{r['frozen_s']:>8.3f} {r['snapshot_s']:>10.2f} {r['restore_s']:>9.2f} "
            f"{r['restore_max_s']:>7.2f}")  # fmt: skip


def _cost_line(c: dict[str, Any]) -> str:
    tar, grown, speed, extra, budget = (_number(c[k]) for k in ("layer_tar_mib", "layer_archive_mib",
                                        "plain_archive_mib_per_s", "extra_s", "budget_s"))  # fmt: skip
    return (f"{c['mib']:>5} {c['kind']:<6} {c['layer_mib']:>5} {c['phase']:<18} {tar:>8} {grown:>12} {speed:>11} "
            f"{extra:>8} {budget:>8}")  # fmt: skip


def _row(
    mib: int, kind: str, label: str, value: float | None, goal: str, judged: float | None, limit: float
) -> dict[str, Any]:
    return {"mib": mib, "kind": kind, "target": label, "value": value, "goal": goal,
            "holds": None if judged is None else judged <= limit}  # fmt: skip
