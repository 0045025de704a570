"""The command line: a thin layer whose exit codes and --json output scripts rely on."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import cgroups, containers, procs
from kerrickpt.cli.main import main
from tests.helpers import KERRICKPT, cgroup_dirs, cli, cli_env, finished, ipc_keys, ticks, unique_name, wait_for


def test_usage_error_exits_2() -> None:
    assert cli().returncode == 2
    assert cli("checkpoint", "x").returncode == 2  # -o is required


def test_help_shows_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "kerrickpt checkpoint job1 -o" in out and "6 archive corrupt" in out


@pytest.mark.root
def test_check_json(capsys: pytest.CaptureFixture[str], state_dir: Path) -> None:
    assert main(["check", "--json", "--state-dir", str(state_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ready"] is True
    assert report["criu_version"] and report["fingerprint"]["arch"]
    assert report["cgroups"]["kind"] in ("v2", "hybrid", "v1")
    assert set(report["features"]) == {
        "userfaultfd", "mem_dirty_track", "lazy_pages", "lazy_pages_confined", "overlay", "user_namespaces",
        "idmapped_lower", "tcp_repair", "external_net_ns", "newifindex", "port_filter", "network_lock",
    }  # fmt: skip
    assert report["features"]["tcp_repair"] and report["features"]["port_filter"] and report["features"]["network_lock"]
    assert set(report["id_ranges"]) == {"source", "uids", "gids", "ranges", "held"}
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
    scripted = cli("check", "--against", str(archive), "--json", KERRICKPT_TEST_FINGERPRINT="kernel=1.0")
    shown = json.loads(scripted.stdout)
    assert scripted.returncode == 7 and shown["error"] == "NodeIncompatibleError", "the error, and the verdict too:"
    assert shown["report"]["compatible"] is False and "older kernel" in json.dumps(shown["report"]["differences"])
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
    assert lines[0].split() == ["NAME", "SNAPSHOT", "TIME", "SIZE", "FROZEN", "NODE", "LAYER", "KEY", "STATUS"]
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


def test_argument_errors_honour_json() -> None:
    missing = cli("kill", "--json")
    shown = json.loads(missing.stdout)
    assert missing.returncode == 2 and shown["error"] == "UsageError" and shown["exit_code"] == 2
    assert "required: name" in shown["message"] and "usage: kerrickpt kill" in missing.stderr


@pytest.mark.root
def test_a_host_error_is_one_line_and_exit_16(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused = cli("ps", "--json", state_dir=blocker / "state")
    assert refused.returncode == 16, refused.stderr
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("kerrickpt: error (exit 16): ")
    assert "Traceback" not in refused.stderr and json.loads(refused.stdout)["error"] == "HostError"


@pytest.mark.root
def test_a_damaged_record_exits_15_and_kill_still_ends_the_container(start_workload, state_dir: Path) -> None:
    w, sound_one = start_workload(), start_workload()
    group = cgroups.Cgroup(tuple(Path(p) for p in w.status.cgroup))
    pids = group.pids()
    record = state_dir / "containers" / w.name / "container.json"
    sound = record.read_text()
    try:
        record.write_text(sound[: len(sound) // 2])  # torn, as by a full disk
        damaged = cli("checkpoint", w.name, "-o", str(state_dir / "x.kckpt"), "--json", state_dir=state_dir)
        assert damaged.returncode == 15, damaged.stderr
        assert "Traceback" not in damaged.stderr and f"kerrickpt kill {w.name}" in damaged.stderr
        assert json.loads(damaged.stdout)["error"] == "StateDamagedError"

        # ps lists the others, and the damaged one as a row that says so.
        listed = cli("ps", "--json", state_dir=state_dir)
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert rows[sound_one.name]["state"] == "running" and rows[sound_one.name]["init_pid"]
        assert rows[w.name] == {
            "name": w.name, "state": "damaged", "init_pid": None, "init_ns_pid": None, "processes": None,
            "memory_bytes": None, "memory_limit": None, "cgroup": [], "log": None, "created": None, "ids": None,
            "address": None,
        }  # fmt: skip
        table = cli("ps", state_dir=state_dir)
        assert table.returncode == 0, table.stderr
        assert [line.split()[:2] for line in table.stdout.splitlines()[1:]] == sorted(
            [[w.name, "damaged"], [sound_one.name, "running"]]
        )

        ended = cli("kill", w.name, state_dir=state_dir)
        assert ended.returncode == 0, ended.stderr
        assert not any(procs.start_time(pid) for pid in pids) and not cgroup_dirs(w.name)
        assert [r["name"] for r in json.loads(cli("ps", "--json", state_dir=state_dir).stdout)] == [sound_one.name]
    finally:
        if record.parent.exists():
            record.write_text(sound)  # the fixture ends it


@pytest.mark.root
def test_a_pending_migration_makes_kill_and_checkpoint_busy(start_workload, state_dir: Path) -> None:
    w = start_workload()
    journal = containers.Registry(state_dir).journal_path(w.name)
    journal.write_text("{}")
    try:
        for args in (("kill", w.name), ("checkpoint", w.name, "-o", str(state_dir / "x.kckpt"))):
            busy = cli(*args, "--json", state_dir=state_dir)
            assert busy.returncode == 13, busy.stderr
            assert json.loads(busy.stdout)["error"] == "BusyError" and f"kerrickpt recover {w.name}" in busy.stderr
        assert w.status.state == "running"
    finally:
        journal.unlink()


SOUND_JOURNAL = {
    "id": "0" * 32,
    "link": {"target": "root@198.18.0.2", "ssh_options": [], "remote_kerrickpt": "kerrickpt"},
    "scratch": "/nonexistent/kerrickpt-scratch",
    "started": "2026-01-01T00:00:00Z",
}


def _without(key: str) -> str:
    return json.dumps({k: v for k, v in SOUND_JOURNAL.items() if k != key})


@pytest.mark.root
@pytest.mark.parametrize(
    "text",
    [
        '{"id": "0000',  # torn, as by a full disk
        "[]",
        _without("link"),
        _without("id"),
        _without("scratch"),
        json.dumps({**SOUND_JOURNAL, "link": {**SOUND_JOURNAL["link"], "target": "no host@"}}),
    ],
    ids=["torn", "not-an-object", "no-link", "no-id", "no-scratch", "bad-target"],
)
def test_recover_with_a_damaged_journal_exits_15_and_leaves_the_container_frozen(
    start_workload, state_dir: Path, text: str
) -> None:
    """The target may run the container: a journal recover cannot read must never thaw it here."""
    w = start_workload()
    group = cgroups.Cgroup(tuple(Path(p) for p in w.status.cgroup))
    journal = containers.Registry(state_dir).journal_path(w.name)
    group.freezer.freeze()
    journal.write_text(text)
    try:
        damaged = cli("recover", w.name, state_dir=state_dir)
        assert damaged.returncode == 15, damaged.stderr
        assert damaged.stderr.count("\n") == 1 and damaged.stderr.startswith("kerrickpt: error (exit 15): ")
        assert f"journal of the migration of {w.name}" in damaged.stderr and "is damaged" in damaged.stderr
        assert group.freezer.is_frozen(), "still frozen"
        assert journal.read_text() == text, "and the journal is left for the operator"
    finally:
        journal.unlink(missing_ok=True)
        group.freezer.thaw()  # the fixture ends it


def _catches(pid: int, signum: int) -> bool:
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask.split()[1], 16) & (1 << (signum - 1)))


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signals_unwind_and_exit_128_plus_n(tmp_path: Path, signum: signal.Signals) -> None:
    store = kerrickpt.Store(tmp_path)
    with store.lock("job"):  # the run waits for it, inside the command, until the signal comes
        run = subprocess.Popen(
            [*KERRICKPT, "snapshot", "job", "--store", str(tmp_path), "--wait", "100"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        try:
            wait_for(lambda: _catches(run.pid, signal.SIGTERM), timeout=60, what="kerrickpt's signal handlers")
            run.send_signal(signum)
            out, err = finished(run, 60)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert run.returncode == 128 + signum, err
    assert err == f"kerrickpt: interrupted by {signum.name} (exit {128 + signum})\n" and out == ""
