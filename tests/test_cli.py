"""The command line: a thin layer whose exit codes and --json output scripts rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt.cli.main import main
from tests.helpers import ipc_keys, ticks, unique_name, wait_for

KERRICKPT = [sys.executable, "-m", "kerrickpt.cli.main"]


def cli(*args: str, state_dir: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run the real command in its own process, to see its real exit code."""
    env = {**os.environ, **extra_env}
    if state_dir:
        env["KERRICKPT_STATE_DIR"] = str(state_dir)
    return subprocess.run([*KERRICKPT, *args], capture_output=True, text=True, env=env, timeout=120)


def test_usage_error_exits_2() -> None:
    assert cli().returncode == 2
    assert cli("checkpoint", "x").returncode == 2  # -o is required


def test_help_shows_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "kerrickpt checkpoint job1 -o" in out and "6 archive corrupt" in out


@pytest.mark.root
def test_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ready"] is True
    assert report["criu_version"] and report["fingerprint"]["arch"]
    assert report["cgroups"]["kind"] in ("v2", "hybrid", "v1")
    assert set(report["features"]) == {"userfaultfd", "mem_dirty_track"}


@pytest.mark.root
def test_error_exit_codes(state_dir: Path, tmp_path: Path) -> None:
    missing = cli("checkpoint", "nope", "-o", str(tmp_path / "x"), "--json", state_dir=state_dir)
    assert missing.returncode == 4
    assert json.loads(missing.stdout)["error"] == "ContainerNotFoundError"
    garbage = tmp_path / "garbage.kckpt"
    garbage.write_bytes(b"not an archive")
    corrupt = cli("restore", str(garbage), state_dir=state_dir)
    assert corrupt.returncode == 6 and "corrupt" in corrupt.stderr
    assert cli("inspect", str(tmp_path / "absent"), state_dir=state_dir).returncode == 6
    assert cli("kill", "nope", state_dir=state_dir).returncode == 4


@pytest.mark.root
def test_full_cycle_through_the_command(state_dir: Path, tmp_path: Path, workload: Path) -> None:
    name = unique_name("cli")
    keys = ipc_keys()
    started = cli("run", "--name", name, "--memory-limit", "256M", "--json", "--", str(workload), "run",
                  *map(str, keys), state_dir=state_dir)  # fmt: skip
    assert started.returncode == 0, started.stderr
    status = json.loads(started.stdout)
    assert status["state"] == "running" and status["init_ns_pid"] == 1
    assert status["memory_limit"] == 256 * 2**20
    log = Path(status["log"])
    wait_for(lambda: len(ticks(log.read_text())) > 3, what="ticks")
    archive = tmp_path / "c.kckpt"

    done = cli("checkpoint", name, "-o", str(archive), "--json", state_dir=state_dir)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["archive"] == str(archive)
    shown = json.loads(cli("inspect", str(archive), "--json").stdout)
    assert shown["name"] == name and shown["memory_limit"] == 256 * 2**20
    assert [p["ns_pid"] for p in shown["processes"]] == [1, 2, 3]
    assert {"frozen_s", "dump_s", "compress_s"} <= shown["timings"].keys()
    assert json.loads(cli("ps", "--json", state_dir=state_dir).stdout) == []

    back = cli("restore", str(archive), state_dir=state_dir)
    assert back.returncode == 0, back.stderr
    assert f"restored {name}" in back.stdout and "  1 -> " in back.stdout
    rows = json.loads(cli("ps", "--json", state_dir=state_dir).stdout)
    assert [(r["name"], r["state"], r["processes"], r["memory_limit"]) for r in rows] == [
        (name, "running", 3, 256 * 2**20)
    ]
    assert cli("kill", name, state_dir=state_dir).returncode == 0
    assert json.loads(cli("ps", "--json", state_dir=state_dir).stdout) == []


@pytest.mark.root
def test_check_against_an_archive(start_workload, state_dir: Path, tmp_path: Path) -> None:
    w = start_workload()
    archive = tmp_path / "w.kckpt"
    kerrickpt.checkpoint(w.name, archive, leave_running=True, state_dir=state_dir)
    same = cli("check", "--against", str(archive), "--json")
    assert same.returncode == 0 and json.loads(same.stdout) == {"compatible": True, "differences": []}
    older = cli("check", "--against", str(archive), KERRICKPT_TEST_FINGERPRINT="kernel=1.0")
    assert older.returncode == 7 and "older kernel" in older.stdout
    assert cli("check", "--against", str(archive), "--force", KERRICKPT_TEST_FINGERPRINT="kernel=1.0").returncode == 0
    other_arch = cli("check", "--against", str(archive), "--force", KERRICKPT_TEST_FINGERPRINT="arch=aarch64")
    assert other_arch.returncode == 7, "--force never accepts another architecture"
