"""`kerrickpt job` under a real Slurm, run by the test user through the site's sudo rule: preempted, requeued
or drained, a job resumes on the other node and its count goes on; scancel ends it; its exit code is Slurm's."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import containers, idranges, privilege
from kerrickpt.errors import NotAllowedError, RestoreFailed
from kerrickpt.localslurm import HIGH, LOW, TEST_USER, LocalSlurm
from tests.helpers import counts, wait_for

pytestmark = pytest.mark.root

TIMEOUT = 180.0  # Slurm's timers (its 5 s wait before a requeued job starts again) and CRIU on a loaded machine
ROOT = Path(__file__).resolve().parent.parent
KERRICKPT_BIN = ROOT / ".venv" / "bin" / "kerrickpt"
SUDOERS = ROOT / "contrib" / "sudoers" / "kerrickpt"
JOBS_IDS = f"{0x70000000}:{64 * 65536}"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    """The site's set-up for users' jobs, as README says to install it: the sudo rule (for this checkout's
    kerrickpt) and /etc/kerrickpt/jobs.toml naming a checkpoints directory and the ids of users' jobs (past the
    node's default pool, as no /etc/subuid entry of root's makes another here); both removed afterwards."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    rule = Path(f"/etc/sudoers.d/kerrickpt-test-{uuid.uuid4().hex[:8]}")
    config = privilege.CONFIG
    saved = config.read_bytes() if config.exists() else None
    made_dir = not config.parent.exists()
    try:
        rule.write_text(SUDOERS.read_text().replace("/usr/local/bin/kerrickpt", str(KERRICKPT_BIN)))
        rule.chmod(0o440)
        config.parent.mkdir(mode=0o755, exist_ok=True)
        config.write_text(f'checkpoints = "{checkpoints}"\nids = "{JOBS_IDS}"\n')
        config.chmod(0o644)
        yield checkpoints
    finally:
        # A user's job is recorded in the node's own state directory (a user cannot choose one): what a failed
        # test left there goes too.
        ours = tuple(f"u{pwd.getpwnam(user).pw_uid}." for user in (TEST_USER, "nobody"))
        for row in kerrickpt.ps():
            if row.name.startswith(ours):
                kerrickpt.kill(row.name)
        rule.unlink(missing_ok=True)
        if saved is not None:
            config.write_bytes(saved)
        else:
            config.unlink(missing_ok=True)
            if made_dir:
                config.parent.rmdir()


@pytest.fixture
def jobs(jobcount: Path) -> Callable[..., contextlib.AbstractContextManager[Jobs]]:
    @contextlib.contextmanager
    def start(**options: object) -> Iterator[Jobs]:
        # Slurm keeps the signals of a requeue or scancel off a container only with its jobs in cgroups.
        options.setdefault("job_cgroups", True)
        with LocalSlurm(requeue_exit=[kerrickpt.REQUEUE_EXIT], **options) as slurm:  # type: ignore[arg-type]
            target = slurm.jobs_dir / "jobcount"
            shutil.copy(jobcount, target)
            target.chmod(0o755)
            yield Jobs(slurm)

    return start


class Jobs:
    """Counting jobs on a local Slurm, each in the foreground of its batch script through sudo."""

    def __init__(self, slurm: LocalSlurm) -> None:
        self.slurm = slurm

    def submit(self, name: str, *sbatch: str, job: str = "", command: str = "/work/jobcount") -> int:
        script = (
            "#!/bin/sh\n"
            f'exec sudo -n {KERRICKPT_BIN} job --name {name} --volume "$(pwd):/work" --workdir /work '
            f'--events "$(pwd)/{name}.events" {job} -- {command}\n'
        )
        return self.slurm.submit(script, "--output=job-%j.out", "--open-mode=append", "--requeue", *sbatch)

    def output(self, job: int) -> str:
        path = self.slurm.jobs_dir / f"job-{job}.out"
        return path.read_text() if path.exists() else ""

    def events(self, name: str) -> list[dict[str, object]]:
        path = self.slurm.jobs_dir / f"{name}.events"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def kinds(self, name: str) -> list[object]:
        return [e["event"] for e in self.events(name)]

    def field(self, job: int, key: str) -> str:
        return self.slurm.job(job)[key]

    def wait(self, predicate: Callable[[], object], what: str) -> None:
        wait_for(predicate, TIMEOUT, what, interval=0.2)

    def running(self, job: int, restarts: int) -> str:
        """Wait until the job runs its `restarts`-th time and counts; returns its node."""
        self.wait(
            lambda: self.field(job, "JobState") == "RUNNING" and self.field(job, "Restarts") == str(restarts),
            f"job {job} running after {restarts} requeues",
        )
        seen = len(counts(self.output(job)))
        self.wait(lambda: len(counts(self.output(job))) > seen + 10, f"job {job} counting")
        return self.field(job, "NodeList")

    def ended(self, job: int) -> str:
        self.wait(lambda: self.field(job, "JobState") not in ("RUNNING", "PENDING", "COMPLETING"), f"job {job} ended")
        return self.field(job, "JobState")


def user_dir(checkpoints: Path, name: str) -> Path:
    return checkpoints / str(pwd.getpwnam(TEST_USER).pw_uid) / name


def assert_counted_on(text: str) -> list[int]:
    numbers = counts(text)
    assert numbers == list(range(1, len(numbers) + 1)), "a count lost or repeated"
    return numbers


def other(slurm: LocalSlurm, node: str) -> str:
    return next(name for name in slurm.names if name != node)


def test_a_preempted_job_checkpoints_is_requeued_and_counts_on_on_the_other_node(site: Path, jobs: Callable) -> None:
    with jobs(grace_time=120) as cluster:
        slurm = cluster.slurm
        low = cluster.submit("pre", f"--partition={LOW}", "--signal=B:USR1", job="--signal USR1")
        node = cluster.running(low, 0)
        high = slurm.submit("#!/bin/sh\nexec sleep 600\n", f"--partition={HIGH}", f"--nodelist={node}")
        assert cluster.running(low, 1) == other(slurm, node), "requeued, on the node still free"
        slurm.run("scancel", str(low), str(high))
        cluster.ended(low)
        numbers = assert_counted_on(cluster.output(low))
        assert cluster.kinds("pre")[:4] == ["started", "checkpoint-start", "checkpointed", "requeue"]
        assert "restored" in cluster.kinds("pre")
        assert len(numbers) > 20
        who = {e["event"]: e for e in cluster.events("pre")}
        assert who["checkpointed"]["final"] is True
        assert 60 < float(who["checkpoint-start"]["within_s"]) <= 120, "the partition's GraceTime, from Slurm"


def test_scontrol_requeue_and_a_drained_node_resume_the_job_where_it_stopped(site: Path, jobs: Callable) -> None:
    with jobs() as cluster:
        slurm = cluster.slurm
        # The count in a child of the container's init: Slurm's SIGTERM must not reach it behind kerrickpt's back.
        job = cluster.submit("req", command="/bin/sh -c '/work/jobcount; echo ended $?'")
        node = cluster.running(job, 0)
        slurm.run("scontrol", "requeue", str(job))
        node = cluster.running(job, 1)
        slurm.run("scontrol", "update", f"nodename={node}", "state=drain", "reason=kerrickpt-test")
        slurm.run("scontrol", "requeue", str(job))
        assert cluster.running(job, 2) == other(slurm, node), "off the drained node"
        slurm.run("scancel", str(job))
        cluster.ended(job)
        assert_counted_on(cluster.output(job))
        assert "ended" not in cluster.output(job)
        assert cluster.kinds("req").count("restored") == 2


def test_a_job_that_ends_by_itself_gives_slurm_its_exit_code_and_leaves_no_checkpoint(
    site: Path, jobs: Callable
) -> None:
    with jobs() as cluster:
        job = cluster.submit("end", job="--every 1s", command="/bin/sh -c '/work/jobcount 60; exit 7'")
        assert cluster.ended(job) == "FAILED"
        assert cluster.field(job, "ExitCode") == "7:0"
        assert counts(cluster.output(job)) == list(range(1, 61))
        assert "checkpointed" in cluster.kinds("end")
        assert not list(user_dir(site, "end").glob("*kckpt*")), "its checkpoints are gone"


def test_scancel_ends_the_job_without_a_checkpoint_and_leaves_nothing_running(site: Path, jobs: Callable) -> None:
    with jobs() as cluster:
        slurm = cluster.slurm
        job = cluster.submit("can")
        cluster.running(job, 0)
        [row] = [c for c in kerrickpt.ps() if c.name.endswith("can")]
        # Slurm 22.05 keeps its jobs' cgroups in the v1 hierarchies of these hybrid hosts; in the unified one the
        # job runs in the cgroup of the slurmd that started it, and its container beneath that.
        v1 = [path for path in row.cgroup if "/unified/" not in path]
        assert v1 and all(f"/job_{job}/step_batch/" in path for path in v1), "in the job's own cgroups"
        assert all("/slurmd/" in path for path in row.cgroup if "/unified/" in path)
        first, count = map(int, JOBS_IDS.split(":"))
        bases = idranges.held(containers.Registry())[row.name]
        assert all(first <= base < first + count for base in bases), "a user's job's range is of the jobs' pool"
        slurm.run("scancel", str(job))
        assert cluster.ended(job) == "CANCELLED"
        print("DBG", cluster.events("can"), kerrickpt.ps())
        assert "checkpoint-start" not in cluster.kinds("can")
        assert not [c for c in kerrickpt.ps() if c.name.endswith("can")], "nothing of it left on the node"
        assert not [p for p in row.cgroup if os.path.exists(p)]
        assert not list(user_dir(site, "can").glob("*kckpt*"))


def test_a_checkpoint_past_the_grace_time_keeps_the_previous_one_which_the_requeued_job_resumes(
    site: Path, jobs: Callable
) -> None:
    with jobs() as cluster:
        slurm = cluster.slurm
        job = cluster.submit("grace", job="--every 2s --grace 0.001")
        cluster.running(job, 0)
        cluster.wait(lambda: "checkpointed" in cluster.kinds("grace"), "a periodic checkpoint")
        slurm.run("scontrol", "requeue", str(job))
        cluster.running(job, 1)
        slurm.run("scancel", str(job))
        cluster.ended(job)
        failed = [e for e in cluster.events("grace") if e["event"] == "checkpoint-failed" and e["final"]]
        assert failed and "grace time" in str(failed[0]["reason"])
        numbers = counts(cluster.output(job))
        again = next(i for i in range(1, len(numbers)) if numbers[i] <= numbers[i - 1])
        assert numbers[again] > 1, "resumed from the periodic checkpoint, not from the start"
        assert numbers[again:] == list(range(numbers[again], numbers[again] + len(numbers) - again))


@pytest.fixture
def work() -> Iterator[Path]:
    """A directory of the test user's, which they can reach (pytest's own are root's alone)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="kerrickpt-work-") as path:
        os.chmod(path, 0o755)
        yield Path(path)


def test_a_job_is_refused_where_slurm_would_signal_its_container_behind_its_back(site: Path, jobs: Callable) -> None:
    with jobs(job_cgroups=False) as cluster:
        job = cluster.submit("tree")
        assert cluster.ended(job) == "FAILED"
        assert cluster.field(job, "ExitCode") == "3:0"
        assert "ProctrackType=proctrack/cgroup" in cluster.output(job)
        assert not cluster.kinds("tree") and not counts(cluster.output(job))


def test_another_user_cannot_restore_read_or_remove_a_users_checkpoints(
    site: Path, jobcount: Path, tmp_path: Path, work: Path
) -> None:
    test_user = pwd.getpwnam(TEST_USER)
    shutil.copy(jobcount, work / "jobcount")
    os.chown(work, test_user.pw_uid, test_user.pw_gid)
    out = tmp_path / "out"
    job = ["sudo", "-n", str(KERRICKPT_BIN), "job", "--name", "mine"]
    as_test_user = ["setpriv", f"--reuid={TEST_USER}", f"--regid={test_user.pw_gid}", "--init-groups", "--"]
    with out.open("ab") as fh:
        mine = subprocess.Popen(
            # setpriv execs sudo: the signal below reaches sudo itself, which passes it on.
            [*as_test_user, *job, "--volume", f"{work}:/work", "--", "/work/jobcount"],
            stdout=fh,
            stderr=fh,
        )
    try:
        wait_for(lambda: len(counts(out.read_text())) > 5, 60, "the test user's job counting")
        mine.terminate()  # to sudo, which passes it on
        assert mine.wait(60) == kerrickpt.REQUEUE_EXIT
    finally:
        if mine.poll() is None:
            mine.kill()
            mine.wait()
    directory = user_dir(site, "mine")
    archive = directory / "mine.kckpt"
    st = directory.stat()
    assert (st.st_uid, st.st_mode & 0o777, archive.stat().st_mode & 0o777) == (0, 0o700, 0o600)

    def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True, text=True, timeout=120)

    for argv in (["cat", str(archive)], ["rm", "-f", str(archive)], ["ls", str(directory)]):
        assert as_nobody(*argv).returncode != 0, argv
    assert archive.exists()
    # Another user's job of that name is theirs: it starts afresh, in their own directory.
    theirs = as_nobody(*job, "--", "/bin/sh", "-c", "exit 4")
    assert theirs.returncode == 4, theirs.stderr
    # They cannot name the test user's directory, nor restore the test user's archive put in their own.
    refused = as_nobody(*job, "--dir", str(directory), "--", "/bin/true")
    assert refused.returncode == NotAllowedError.exit_code, refused.stderr
    planted = user_dir(site, "mine").parent.parent / str(pwd.getpwnam("nobody").pw_uid) / "mine"
    shutil.copy(archive, planted / "mine.kckpt")
    stolen = as_nobody(*job, "--", "/bin/true")
    assert stolen.returncode == NotAllowedError.exit_code, stolen.stderr
    assert f"runs as uid {test_user.pw_uid}" in stolen.stderr
    assert archive.exists() and not [c for c in kerrickpt.ps() if c.name.endswith("mine")]


# A user's job holding a file of its volume open and mapped: it says its ids, then what both show, until stopped.
HOLDER = """
import mmap, os, time
fd = os.open("/work/data", os.O_RDONLY)
view = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
with open("/work/ids", "w") as fh:
    fh.write(f"{os.getuid()} {os.getgid()}")
i = 0
while True:
    i += 1
    print(f"tick {i} fd {os.pread(fd, 64, 0)!r} map {view[:]!r}", flush=True)
    time.sleep(0.05)
"""
DATA, SECRET = b"the job's own data\n", b"ROOT-ONLY-SECRET!\n\n"  # of one size, as CRIU checks a file's size


@pytest.fixture
def secret() -> Iterator[Path]:
    """A root-only file (0600) the size of DATA, where the container's root (the node's own) shows it."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="kerrickpt-secret-") as path:
        os.chmod(path, 0o755)
        file = Path(path) / "secret"
        file.write_bytes(SECRET)
        file.chmod(0o600)
        yield file


def test_a_file_swapped_for_a_link_to_a_root_only_file_is_never_opened_by_the_resumed_job(
    site: Path, work: Path, secret: Path, tmp_path: Path
) -> None:
    assert len(DATA) == len(SECRET)
    user = pwd.getpwnam(TEST_USER)
    os.chown(work, user.pw_uid, user.pw_gid)
    as_user = ["setpriv", f"--reuid={TEST_USER}", f"--regid={user.pw_gid}", "--init-groups", "--"]
    data = work / "data"
    data.write_bytes(DATA)
    data.chmod(0o600)  # the mode of the secret: CRIU checks a file's mode too
    os.chown(data, user.pw_uid, user.pw_gid)
    out = tmp_path / "out"
    job = [*as_user, "sudo", "-n", str(KERRICKPT_BIN), "job", "--name", "holder", "--volume", f"{work}:/work"]
    job += ["--", "/usr/bin/python3", "-c", HOLDER]

    def started(ticks: int) -> subprocess.Popen[bytes]:
        seen = out.read_text().count("tick") if out.exists() else 0
        with out.open("ab") as fh:
            process = subprocess.Popen(job, stdout=fh, stderr=fh)
        wait_for(lambda: out.read_text().count("tick") > seen + ticks or process.poll() is not None, 60, "ticks")
        return process

    def checkpointed(process: subprocess.Popen[bytes]) -> None:
        try:
            process.terminate()  # to sudo, which passes it on
            assert process.wait(60) == kerrickpt.REQUEUE_EXIT, out.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    checkpointed(started(5))
    assert (work / "ids").read_text() == f"{user.pw_uid} {user.pw_gid}", "the job sees its own ids"
    owned = (work / "ids").stat()
    assert (owned.st_uid, owned.st_gid) == (user.pw_uid, user.pw_gid), "its file is its user's on the host"
    swap = ["sh", "-c", f"mv {data} {data}.real && ln -s {secret} {data}"]
    subprocess.run([*as_user, *swap], check=True, timeout=30)

    resumed = subprocess.run(job, capture_output=True, timeout=120)

    assert resumed.returncode == RestoreFailed.exit_code, resumed.stderr
    assert b"Can't open file work/data on restore: Permission denied" in resumed.stderr, resumed.stderr
    assert b"ROOT-ONLY" not in resumed.stdout + resumed.stderr + out.read_bytes(), "the secret reached the job"
    assert not [c for c in kerrickpt.ps() if c.name.endswith("holder")], "nothing of the failed restore runs"
    # The checkpoint is kept: with the user's file back, the job resumes and reads its own data again.
    subprocess.run([*as_user, "sh", "-c", f"rm {data} && mv {data}.real {data}"], check=True, timeout=30)
    before = out.read_text().count("tick")
    checkpointed(started(5))
    text = out.read_text()
    assert f"tick {before + 1} " in text, "it resumed where it stopped"
    assert "ROOT-ONLY" not in text and repr(DATA) in text
