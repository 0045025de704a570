"""Owns the benchmark's picture: each case's times against memory size, and the repeated snapshots' frozen windows."""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # not pyplot: a file, never a window, and no global state
from matplotlib.ticker import FuncFormatter

from bench.report import REPEATED_FROZEN, p95

# What each of the three panels plots, as (line label, metric): kerrickpt's cases (solid) and the baselines
# (dashed). The confined cases add a line per layer size, from the metrics the run has (see CONFINED).
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]], ...] = (
    (
        "checkpoint",
        (
            ("raw: criu dump", "raw.dump_s"),
            ("sequential: dump + tar|zstd", "seq.export_s"),
            ("runc checkpoint", "runc.checkpoint_s"),
            ("DMTCP checkpoint", "dmtcp.checkpoint_s"),
            ("kerrickpt checkpoint", "kpt.checkpoint_s"),
            ("kerrickpt snapshot: frozen", "kpt.snapshot_frozen_s"),
            ("kerrickpt job: signal to checkpoint", "job.checkpoint_s"),
        ),
        ("checkpoint_s",),
    ),
    (
        "restore",
        (
            ("raw: criu restore", "raw.restore_s"),
            ("sequential: unpack + restore", "seq.unpack_restore_s"),
            ("runc restore", "runc.restore_s"),
            ("DMTCP restart", "dmtcp.resume_s"),
            ("kerrickpt restore", "kpt.restore_s"),
            ("kerrickpt job: requeued to running", "job.resume_s"),
        ),
        ("restore_s",),
    ),
    (
        "downtime",
        (
            ("raw: dump + restore", "raw.downtime_s"),
            ("sequential: dump to restored", "seq.downtime_s"),
            ("runc: checkpoint + restore", "runc.downtime_s"),
            ("kerrickpt checkpoint + restore", "kpt.downtime_s"),
            ("kerrickpt migrate", "kpt.migrate_downtime_s"),
            ("kerrickpt migrate --lazy", "kpt.migrate_lazy_downtime_s"),
            ("kerrickpt migrate --net own, connections", "net.downtime_s"),
            ("kerrickpt migrate --net own, none", "net.idle_downtime_s"),
        ),
        ("downtime_s", "migrate_downtime_s"),
    ),
)
CONFINED = re.compile(r"^conf\.L(\d+)\.(\w+)$")
BASELINES = ("raw.", "seq.", "runc.", "dmtcp.")


def draw(report: dict[str, Any], path: Path) -> None:
    """Write the picture of `report` (bench/run's JSON) to `path` as PNG: a row per workload kind, with
    checkpoint, restore and downtime against memory size (median, min-max bars, log-log), then the
    distribution of the frozen windows of the repeated snapshots at each size they ran."""
    rows: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in report["results"]:
        rows[(row["kind"], row["metric"])][row["mib"]] = row
    kinds = sorted({kind for kind, _ in rows})
    figure = Figure(figsize=(24, 5.5 * max(len(kinds), 1)))
    axes = figure.subplots(max(len(kinds), 1), 4, squeeze=False)
    for line, kind in zip(axes, kinds, strict=False):
        for ax, (title, lines, confined) in zip(line[:3], PANELS, strict=True):
            _sizes_panel(ax, f"{title}, {kind}", [*lines, *_confined(rows, kind, confined)], rows, kind)
        _frozen_panel(line[3], kind, rows.get((kind, REPEATED_FROZEN), {}))
    figure.suptitle(f"bench/run on {_machine(report['machine'])}: {report['config'].get('command', '')}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def _confined(rows: dict[tuple[str, str], Any], kind: str, whats: tuple[str, ...]) -> list[tuple[str, str]]:
    """A line for each confined metric of the run that is one of `whats`, by layer size."""
    found = []
    for k, metric in rows:
        if k == kind and (m := CONFINED.match(metric)) and m.group(2) in whats:
            verb = "migrate" if m.group(2).startswith("migrate") else m.group(2).removesuffix("_s")
            found.append((int(m.group(1)), f"kerrickpt confined, layer {m.group(1)} MiB: {verb}", metric))
    return [(label, metric) for _, label, metric in sorted(found)]


def _sizes_panel(
    ax: Axes, title: str, lines: list[tuple[str, str]], rows: dict[tuple[str, str], Any], kind: str
) -> None:
    plotted, sizes_seen = 0, set()
    # A downtime panel has a dozen lines: the default cycle's ten colours would repeat.
    pairs = colormaps["tab20"].colors
    ax.set_prop_cycle(color=[*pairs[::2], *pairs[1::2]])
    for label, metric in lines:
        by_size = rows.get((kind, metric))
        if not by_size:
            continue
        sizes = sorted(by_size)
        medians = [by_size[m]["median"] for m in sizes]
        below = [by_size[m]["median"] - by_size[m]["min"] for m in sizes]
        above = [by_size[m]["max"] - by_size[m]["median"] for m in sizes]
        style = "--" if metric.startswith(BASELINES) else "-"
        ax.errorbar(sizes, medians, yerr=[below, above], label=label, linestyle=style, marker="o", capsize=3)
        plotted += 1
        sizes_seen.update(sizes)
    ax.set_title(title)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory, MiB")
    ax.set_ylabel("seconds (median, min-max bars)")
    if plotted:
        ax.set_xticks(sorted(sizes_seen), [str(m) for m in sorted(sizes_seen)])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    else:
        ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)


def _two_and_five(value: float, _position: int) -> str:
    """Labels for a log axis's minor ticks at 2 and 5 times a power of ten: enough to read a value off."""
    leading = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:g}" if leading in (2, 5) else ""


def _frozen_panel(ax: Axes, kind: str, by_size: dict[int, dict[str, Any]]) -> None:
    """A box per size (whiskers at min and max), every snapshot as a dot, the p95 as a red bar."""
    ax.set_title(f"frozen window of repeated snapshots, {kind}")
    if not by_size:
        ax.text(0.5, 0.5, "no repeated snapshots in this run", ha="center", va="center", transform=ax.transAxes)
        return
    sizes = sorted(by_size)
    samples = [by_size[m]["samples"] for m in sizes]
    positions = list(range(1, len(sizes) + 1))
    ax.boxplot(samples, positions=positions, whis=(0, 100), widths=0.5)
    jitter = random.Random(0)  # the same picture from the same numbers
    for at, values in zip(positions, samples, strict=True):
        ax.scatter([at + jitter.uniform(-0.15, 0.15) for _ in values], values, s=12, alpha=0.6)
        ax.hlines(p95(values), at - 0.3, at + 0.3, colors="red", label="p95" if at == 1 else None)
    ax.set_xticks(positions, [f"{m} MiB\n{len(by_size[m]['samples'])} snapshots" for m in sizes])
    ax.set_ylabel("seconds frozen")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)


def _machine(machine: dict[str, str]) -> str:
    cores, memory, kernel = (machine.get(k, "?") for k in ("nproc", "memory_gib", "kernel"))
    return f"{cores} cores, {memory} GiB, kernel {kernel}"
