"""The command line: a thin layer whose exit codes and --json output scripts rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt.cli.main import main
from tests.helpers import cli, ipc_keys, ticks, unique_name, wait_for


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
    assert set(report["features"]) == {"userfaultfd", "mem_dirty_track", "lazy_pages"}
    pipes_ok = int(Path("/proc/sys/fs/pipe-max-size").read_text()) >= 4 * 2**20 or report["can_dump_other_users"]
    assert report["features"]["lazy_pages"] == (report["features"]["userfaultfd"] and pipes_ok)


@pytest.mark.root
def test_error_exit_codes(state_dir: Path, tmp_path: Path) -> None:
    missing = cli("checkpoint", "nope", "-o", str(tmp_path / "x"), "--json", state_dir=state_dir)
    assert missing.returncode == 4
    assert json.loads(missing.stdout)["error"] == "ContainerNotFoundError"
    garbage = tmp_path / "garbage.kckpt"
    garbage.write_bytes(b"not an archive")
    corrupt = cli("restore", str(garbage), state_dir=state_dir)
    assert corrupt.returncode == 6 and "not a kerrickpt archive" in corrupt.stderr
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
    assert shown["compression"] == {"level": kerrickpt.CHECKPOINT_LEVEL} and shown["checksum"] == "xxh3_128"
    assert f"zstd level {kerrickpt.CHECKPOINT_LEVEL}, xxh3_128 checksums" in cli("inspect", str(archive)).stdout
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


def test_snapshot_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli("snapshot", "x").returncode == 2  # --store is required
    assert cli("snapshots").returncode == 2
    assert cli("snapshots", "prune", "--store", str(tmp_path)).returncode == 2  # no --keep-* rule
    missing = cli("snapshots", "list", "--store", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "create it first" in missing.stderr
    picked = cli("restore", "x", "--latest")
    assert picked.returncode == 2 and "--store" in picked.stderr


def test_help_shows_snapshot_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "kerrickpt snapshot job1 --store" in out and "kerrickpt restore --store" in out
    assert "20 no such snapshot in the store" in out


@pytest.mark.root
def test_snapshots_through_the_command(start_workload, state_dir: Path, tmp_path: Path) -> None:
    w = start_workload()
    store = tmp_path / "store"
    store.mkdir()
    s = str(store)

    quiet = cli("snapshot", w.name, "--store", s, "--quiet", state_dir=state_dir)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", ""), "silent on success: cron mails nothing"
    logged = cli("snapshot", w.name, "--store", s, state_dir=state_dir)
    assert logged.returncode == 0 and logged.stdout == ""
    assert logged.stderr.startswith(f"kerrickpt: snapshot {w.name} ") and logged.stderr.count("\n") == 1
    third = cli("snapshot", w.name, "--store", s, "--keep-last", "2", "--json", "--quiet", state_dir=state_dir)
    shown = json.loads(third.stdout)
    assert shown["snapshot"]["status"] == "verified" and len(shown["kept"]) == 2 and len(shown["removed"]) == 1

    lines = cli("snapshots", "list", "--store", s).stdout.splitlines()
    assert lines[0].split() == ["NAME", "SNAPSHOT", "TIME", "SIZE", "FROZEN", "NODE", "STATUS"]
    assert len(lines) == 3 and all(line.startswith(w.name) and line.endswith(" verified") for line in lines[1:])
    rows = json.loads(cli("snapshots", "list", "--store", s, w.name, "--json").stdout)
    older, newer = (r["id"] for r in rows)
    assert older < newer and all(r["frozen_s"] > 0 and r["node"] for r in rows)

    dry = cli("snapshots", "prune", "--store", s, "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0 and "rule: keep the newest snapshot" in dry.stdout
    verdicts = {snap: line for line in dry.stdout.splitlines() for snap in (older, newer) if f" {snap} " in line}
    assert verdicts[newer].startswith("keep") and verdicts[newer].endswith(": last #1")
    assert verdicts[older].startswith("would remove") and verdicts[older].endswith(": no rule keeps it")
    pruned = json.loads(cli("snapshots", "prune", "--store", s, "--keep-last", "1", "--json").stdout)
    assert [(d["id"], d["keep"]) for d in pruned["containers"][w.name]] == [(newer, True), (older, False)]

    verified = cli("snapshots", "verify", "--store", s)
    assert verified.returncode == 0 and f"ok {w.name} {newer}" in verified.stdout
    path = store / w.name / f"{newer}.kckpt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    damaged = cli("snapshots", "verify", "--store", s)
    assert damaged.returncode == 6 and f"corrupt: {path}" in damaged.stderr
    nothing = cli("restore", "--store", s, w.name, "--name", unique_name(), state_dir=state_dir)
    assert nothing.returncode == 20 and "no usable snapshot" in nothing.stderr
