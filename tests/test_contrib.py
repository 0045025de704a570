"""The shipped crontab line and systemd units run a valid `kerrickpt snapshot`, and systemd accepts the units."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from kerrickpt.cli.main import build_parser, cmd_snapshot

CONTRIB = Path(__file__).parent.parent / "contrib"
SERVICE = CONTRIB / "systemd" / "kerrickpt-snapshot@.service"
TIMER = CONTRIB / "systemd" / "kerrickpt-snapshot@.timer"
INSTALLED = "/usr/local/bin/kerrickpt"


def cron_command() -> list[str]:
    line = CONTRIB.joinpath("cron", "kerrickpt-snapshot").read_text().strip().splitlines()[-1]
    return line.split()[6:]  # after the five time fields and the user


def service_command() -> list[str]:
    text = SERVICE.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    return [arg.replace("%i", "job1") for arg in shlex.split(line.removeprefix("ExecStart="))]


def test_both_schedules_run_a_valid_snapshot_command() -> None:
    for argv, quiet in ((cron_command(), True), (service_command(), False)):
        assert Path(argv[0]).name == "kerrickpt"
        args = build_parser().parse_args(argv[1:])
        assert args.func is cmd_snapshot and args.name == "job1"
        assert args.store == "/srv/kerrickpt/snapshots" and args.keep_daily and args.wait
        assert args.quiet is quiet, "cron mails output, so it runs quiet; the journal wants the log line"


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    here = Path(sys.executable).with_name("kerrickpt")  # the installed path does not exist on a test machine
    (tmp_path / SERVICE.name).write_text(SERVICE.read_text().replace(INSTALLED, str(here)))
    (tmp_path / TIMER.name).write_text(TIMER.read_text())
    units = ["kerrickpt-snapshot@job1.service", "kerrickpt-snapshot@job1.timer"]
    verdict = subprocess.run(
        ["systemd-analyze", "verify", *units], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert verdict.returncode == 0, verdict.stderr
    assert "KillMode=process" in SERVICE.read_text(), "a stopped run must leave the guardian to thaw the container"
