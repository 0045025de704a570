"""Confined containers (`run --rootfs`): their own root, users and mounts, checkpointed, restored and moved
with their files, by the real kernel and CRIU."""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import archive, archivewriter, containers, idranges
from kerrickpt.errors import ArchiveCorruptError
from tests.helpers import CONFINED_USER, cgroup_dirs, cli, host_status, ipc_keys, probe, ticks, unique_name, wait_for

pytestmark = pytest.mark.root

USER = CONFINED_USER  # the user the tests' commands run as inside: not root
BIN = "/opt/kerrickpt-test"  # where the compiled workload is bound in, read-only
# A job that appends numbered records to a file in its layer and says each in its log.
STEPS = 'i=0; while :; do i=$((i+1)); echo "step $i" >> /var/tmp/steps; echo "tick $i pid $$"; sleep 0.05; done'


@pytest.fixture(scope="session")
def bin_dir(workload: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workload in a directory any user may read: the container's user finds it through a volume
    (its own /tmp, a tmpfs, hides the host's)."""
    directory = tmp_path_factory.mktemp("confined-bin")
    directory.chmod(0o755)
    shutil.copy(workload, directory / "ipcworkload")
    return directory


def upper(state_dir: Path, name: str) -> Path:
    return state_dir / "containers" / name / "layer" / "upper"


def log(state_dir: Path, name: str) -> str:
    return (state_dir / "containers" / name / "log").read_text()


def run_steps(state_dir: Path, name: str | None = None) -> str:
    name = name or unique_name("conf")
    kerrickpt.run(name, ["sh", "-c", STEPS], state_dir=state_dir, rootfs="host", user=str(USER))
    wait_for(lambda: len(ticks(log(state_dir, name))) > 3, what="steps")
    return name


def steps_written(state_dir: Path, name: str) -> list[int]:
    return [int(n) for n in re.findall(r"^step (\d+)$", (upper(state_dir, name) / "var/tmp/steps").read_text(), re.M)]


def test_a_confined_container_has_its_own_root_users_and_mounts(state_dir: Path) -> None:
    name = unique_name("conf")
    marker = f"kerrickpt-{name}"
    script = (
        f"echo inside > /var/tmp/{marker}; ls /dev > /tmp/dev; cp /tmp/dev /var/tmp/dev; "
        "touch /sys/kerrickpt 2>/var/tmp/sys; id -u > /var/tmp/uid; hostname > /var/tmp/host; exec sleep 600"
    )
    status = kerrickpt.run(name, ["sh", "-c", script], state_dir=state_dir, rootfs="host", user=str(USER))
    layer = upper(state_dir, name)
    wait_for(lambda: (layer / "var/tmp/host").exists(), what="the script to finish")

    record = containers.Registry(state_dir).get(name).confinement
    assert record is not None and record.rootfs == "host"
    proc = host_status(status.init_pid)
    assert proc["Uid"].split()[0] == str(record.uid_base + USER), "container uid 1000 is a host id of its range"
    assert proc["NSpid"].split()[-1] == "1"
    uid_map = Path(f"/proc/{status.init_pid}/uid_map").read_text().split()
    assert uid_map == ["0", str(record.uid_base), "65536"] and record.uid_base > 0, "container root is not host root"
    assert (layer / "var/tmp/uid").read_text().strip() == str(USER)
    assert (layer / "var/tmp/host").read_text().strip() == name
    assert (kerrickpt.check(state_dir).id_ranges or {})["held"] == 1, "check counts the range it holds"
    # What it wrote landed in its own layer, owned by its user's host id, and not on the host.
    assert (layer / f"var/tmp/{marker}").stat().st_uid == record.uid_base + USER
    assert not Path(f"/var/tmp/{marker}").exists()
    assert set((layer / "var/tmp/dev").read_text().split()) == {
        "null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin", "stdout", "stderr"
    }  # fmt: skip
    assert "Read-only file system" in (layer / "var/tmp/sys").read_text()
    mountinfo = Path(f"/proc/{status.init_pid}/mountinfo").read_text().splitlines()
    mounts = {line.split()[4]: line.split(" - ")[1].split()[0] for line in mountinfo}
    assert mounts["/"] == "overlay" and mounts["/proc"] == "proc" and mounts["/tmp"] == "tmpfs"
    assert not (layer / "tmp/dev").exists(), "/tmp is a tmpfs of its own, not the layer"


def test_a_non_root_workload_checkpoints_and_restores_with_its_pids_and_ipc(
    state_dir: Path, bin_dir: Path, tmp_path: Path
) -> None:
    name = unique_name("conf")
    keys = ipc_keys()
    kerrickpt.run(
        name,
        [f"{BIN}/ipcworkload", "run", *map(str, keys)],
        state_dir=state_dir,
        rootfs="host",
        user=str(USER),
        volumes=[f"{bin_dir}:{BIN}:ro"],
    )
    wait_for(lambda: len(ticks(log(state_dir, name))) > 3, what="ticks")
    init = next(r for r in kerrickpt.ps(state_dir) if r.name == name).init_pid
    assert init is not None
    before = probe(bin_dir / "ipcworkload", init, keys)
    archive = tmp_path / "w.kckpt"

    kerrickpt.checkpoint(name, archive, state_dir=state_dir)
    assert not (state_dir / "containers" / name).exists(), "the checkpoint ended the container"
    restored = kerrickpt.restore(archive, state_dir=state_dir)

    assert sorted(restored.pid_map) == [1, 2, 3]
    record = containers.Registry(state_dir).get(name).confinement
    assert record is not None
    for host_pid in restored.pid_map.values():
        assert host_status(host_pid)["Uid"].split()[0] == str(record.uid_base + USER)
    seen = max(ticks(log(state_dir, name)))
    wait_for(lambda: max(ticks(log(state_dir, name))) > seen + 2, what="counting on")
    numbers = ticks(log(state_dir, name))
    assert numbers == list(range(1, len(numbers) + 1)), "the counter went on where it stopped"
    after = probe(bin_dir / "ipcworkload", restored.init_pid, keys)
    for key in ("shm_id", "msg_id", "sem_id", "data_sha", "messages", "sems"):
        assert after[key] == before[key], key


def test_a_restore_from_an_older_snapshot_gets_the_files_as_they_were(state_dir: Path, tmp_path: Path) -> None:
    name = run_steps(state_dir)
    snapshot = tmp_path / "older.kckpt"
    kerrickpt.checkpoint(name, snapshot, state_dir=state_dir, leave_running=True)
    seen = max(ticks(log(state_dir, name)))
    wait_for(lambda: max(ticks(log(state_dir, name))) > seen + 10, what="more steps after the snapshot")
    kerrickpt.kill(name, state_dir)

    kerrickpt.restore(snapshot, state_dir=state_dir)
    seen = max(ticks(log(state_dir, name)))
    wait_for(lambda: max(ticks(log(state_dir, name))) > seen + 5, what="steps after the restore")

    written = steps_written(state_dir, name)
    assert written == list(range(1, len(written) + 1)), "no record written twice, none lost"


def test_checkpoint_and_restore_carry_the_layer_under_another_name(state_dir: Path, tmp_path: Path) -> None:
    name = run_steps(state_dir)
    archive = tmp_path / "c.kckpt"
    kerrickpt.checkpoint(name, archive, state_dir=state_dir, leave_running=True)
    copy = unique_name("copy")

    kerrickpt.restore(archive, name=copy, state_dir=state_dir)

    wait_for(lambda: len(steps_written(state_dir, copy)) > len(steps_written(state_dir, name)) // 2, what="copy")
    mine, theirs = steps_written(state_dir, name), steps_written(state_dir, copy)
    assert theirs == list(range(1, len(theirs) + 1))
    shared = min(len(mine), len(theirs))
    assert mine[:shared] == theirs[:shared]
    a = containers.Registry(state_dir).get(name).confinement
    b = containers.Registry(state_dir).get(copy).confinement
    assert a is not None and b is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rootfs", "/nonexistent/root", "--", "true"], "does not exist"),
        (["--rootfs", "/etc/hostname", "--", "true"], "is not a directory"),
        (["--rootfs", "host", "--", "/no/such/program"], "no such program"),
        (["--rootfs", "host", "--user", "no-such-user", "--", "true"], "no user"),
        (["--rootfs", "host", "--volume", "/nonexistent:/data", "--", "true"], "does not exist"),
        (["--rootfs", "host", "--volume", "/etc:/proc", "--", "true"], "the container's own"),
        (["--rootfs", "host", "--volume", "/etc:/tmp/etc", "--", "true"], "the container's own"),
        (["--user", "1000", "--", "true"], "--rootfs"),
        (["--rootfs", "host", "--workdir", "/no/such/dir", "--", "true"], "no such directory"),
        # /var/run is a link to /run here: a bind point through it would be made on the host's /run.
        (["--rootfs", "host", "--volume", "/etc:/var/run/kerrickpt-test", "--", "true"], "symbolic link"),
    ],
)
def test_bad_confinement_is_refused_before_anything_starts(state_dir: Path, args: list[str], message: str) -> None:
    name = unique_name("bad")
    result = cli("run", "--name", name, *args, state_dir=state_dir)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not Path("/run/kerrickpt-test").exists()
    assert not (state_dir / "containers" / name).exists()
    assert cgroup_dirs(name) == []


def test_an_empty_rootfs_directory_has_no_command_to_run(state_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = cli("run", "--name", unique_name("bad"), "--rootfs", str(root), "--", "sh", state_dir=state_dir)
    assert result.returncode == 2 and "no such program" in result.stderr


def test_volumes_are_bound_in_and_stay_on_the_host(state_dir: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    sealed = tmp_path / "sealed"
    sealed.mkdir()
    note = tmp_path / "note"
    note.write_text("a file of the host's\n")
    note.chmod(0o644)
    name = unique_name("vol")
    script = (
        "cat /etc/note > /data/note; echo hello > /data/out; echo no 2>/data/sealed-error >/sealed/out; exec sleep 600"
    )
    kerrickpt.run(
        name,
        ["sh", "-c", script],
        state_dir=state_dir,
        rootfs="host",
        user=str(USER),
        volumes=[f"{shared}:/data", f"{sealed}:/sealed:ro", f"{note}:/etc/note:ro"],
    )
    wait_for(lambda: (shared / "sealed-error").exists(), what="the script")
    assert (shared / "out").read_text() == "hello\n"
    assert (shared / "note").read_text() == "a file of the host's\n", "a file is bound as a file"
    assert "Read-only file system" in (shared / "sealed-error").read_text()
    assert not (sealed / "out").exists()


def test_an_archive_whose_layer_escapes_its_root_is_refused_before_any_process_runs(
    state_dir: Path, tmp_path: Path
) -> None:
    name = run_steps(state_dir)
    good = tmp_path / "good.kckpt"
    kerrickpt.checkpoint(name, good, state_dir=state_dir)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    manifest = archive.extract(good, unpacked)
    hostile = tmp_path / "layer.tar"
    victim = tmp_path / "victim"
    with tarfile.open(hostile, "w") as tar:
        entry = tarfile.TarInfo("escape")
        entry.type, entry.linkname = tarfile.SYMTYPE, str(tmp_path)
        tar.addfile(entry)
        data = tarfile.TarInfo("escape/victim")
        tar.addfile(data)
    files = {m.name: unpacked / m.name for m in manifest.members if m.name != "layer.tar"}
    files["layer.tar"] = hostile
    bad = tmp_path / "bad.kckpt"
    archivewriter.write(bad, manifest, files)

    with pytest.raises(ArchiveCorruptError):
        kerrickpt.restore(bad, state_dir=state_dir)

    assert not victim.exists()
    assert kerrickpt.ps(state_dir) == []
    assert cgroup_dirs(name) == []


def test_exec_runs_in_a_confined_container_as_its_user_on_its_root(state_dir: Path) -> None:
    name = run_steps(state_dir)
    script = "id -u; echo \"$X $HOSTNAME\"; tail -n 1 /var/tmp/steps; awk '{print $2}' /proc/self/uid_map"
    shown = cli("exec", name, "--env", "X=y", "--", "sh", "-c", script, state_dir=state_dir)
    assert shown.returncode == 0, shown.stderr
    uid, env, step, base = shown.stdout.splitlines()
    record = containers.Registry(state_dir).get(name).confinement
    assert record is not None
    assert (uid, env, base) == (str(USER), f"y {name}", str(record.uid_base))
    assert re.fullmatch(r"step \d+", step), "it reads the container's layer, not the host's /var/tmp"


def test_a_confined_restore_streams_its_images_after_its_layer_and_never_runs_before_the_verdict(
    state_dir: Path, tmp_path: Path
) -> None:
    name = run_steps(state_dir)
    snapshot = tmp_path / "c.kckpt"
    kerrickpt.checkpoint(name, snapshot, state_dir=state_dir, leave_running=True)
    assert archive.read_manifest(snapshot).members[0].name == "layer.tar", "the layer comes first"
    copy = unique_name("copy")

    # Only a streamed restore reaches its verdict with CRIU under way; failing there must end the tree unseen.
    fault = "restore-before-verdict:fail"
    failed = cli("restore", str(snapshot), "--name", copy, state_dir=state_dir, KERRICKPT_FAULT=fault)

    assert failed.returncode == 8, failed.stderr
    assert [r.name for r in kerrickpt.ps(state_dir)] == [name]
    assert not (state_dir / "containers" / copy).exists()
    assert cgroup_dirs(copy) == []
    assert set(idranges.held(containers.Registry(state_dir))) == {name}, "the copy's id range was released"
