"""A user reaches kerrickpt through sudo as themselves, for their own jobs, checkpoints and volumes only."""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kerrickpt import isolation, privilege
from kerrickpt.confinement import HOST_ROOT, RANGE, Confinement, Volume
from kerrickpt.errors import NoIdRangeError, NotAllowedError, NotReadyError, UntrustedStoreError, UsageError
from kerrickpt.localslurm import TEST_USER
from kerrickpt.manifest import Manifest
from kerrickpt.netports import Port
from kerrickpt.network import Identity
from kerrickpt.node import Fingerprint
from kerrickpt.privilege import Caller, RunOptions, Site

pytestmark = pytest.mark.root

CONTRIB = Path(__file__).parent.parent / "contrib"
SUDOERS = CONTRIB / "sudoers" / "kerrickpt"
INSTALLED = "/usr/local/bin/kerrickpt"
SOURCE = Fingerprint("x86_64", "6.1.0", "debian 12", "4.2.1", ("fpu",), 4096, "v2")
# Users' jobs' ids as the tests' site declares them: past the node's default pool, which ends at 0x70000000.
JOBS_IDS = (0x70000000, 16 * RANGE)
JOBS = isolation.declared_pool(*JOBS_IDS, "test")

# Run as root by sudo: who kerrickpt takes the caller for, and how it rules on each request given as JSON.
ENTRY = f"""#!{sys.executable}
import json, sys
from dataclasses import asdict
from pathlib import Path
from kerrickpt import isolation, privilege
from kerrickpt.errors import KerrickptError
who = privilege.caller()
answers = []
for asked in json.loads(sys.argv[1]):
    options = privilege.RunOptions(**{{**asked["options"], "volumes": tuple(asked["options"].get("volumes", ()))}})
    try:
        found = privilege.job_request(
            who, asked["name"], asked["dir"], options,
            where=privilege.Site(Path(asked["checkpoints"]), isolation.declared_pool(*{JOBS_IDS}, "test")),
        )
        answers.append({{"directory": str(found.directory), "options": asdict(found.options),
                        "pool": found.pool.to_dict()}})
    except KerrickptError as exc:
        answers.append({{"error": type(exc).__name__, "exit_code": exc.exit_code, "message": exc.message}})
print(json.dumps({{"caller": asdict(who), "answers": answers}}))
"""


def sudo_user() -> Caller:
    entry = pwd.getpwnam(TEST_USER)
    groups = tuple(sorted(set(os.getgrouplist(TEST_USER, entry.pw_gid))))
    return Caller(entry.pw_uid, entry.pw_gid, groups, TEST_USER, through_sudo=True)


@contextlib.contextmanager
def sudo_rule(text: str) -> Iterator[None]:
    """`text` in /etc/sudoers.d for the duration (sudo skips names with a dot, so none has one)."""
    fd, path = tempfile.mkstemp(prefix="kerrickpt-test-", dir="/etc/sudoers.d")
    try:
        os.write(fd, text.encode())
        os.close(fd)
        os.chmod(path, 0o440)
        checked = subprocess.run(["visudo", "-cf", path], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        yield
    finally:
        os.unlink(path)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A root-owned directory others may enter (pytest's own are root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="kerrickpt-priv-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def extra_group() -> Iterator[int]:
    """A supplementary group of the test user's, for the duration."""
    name = f"kptg{os.getpid()}"
    subprocess.run(["groupadd", "--users", TEST_USER, name], check=True, timeout=30)
    try:
        yield grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], check=True, timeout=30)


@pytest.fixture
def checkpoints(public_dir: Path) -> Path:
    path = public_dir / "jobs"
    path.mkdir(mode=0o755)
    return path


def through_sudo(public_dir: Path, requests: list[dict[str, object]], *env: str) -> dict[str, object]:
    entry = public_dir / "whoasks"
    entry.write_text(ENTRY)
    entry.chmod(0o755)
    with sudo_rule(f"{TEST_USER} ALL=(root) NOPASSWD: {entry}\n"):
        argv = ["sudo", "-u", TEST_USER, "env", *env, "sudo", "-n", str(entry), json.dumps(requests)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_a_user_through_sudo_is_taken_for_themselves_and_refused_what_is_not_theirs(
    public_dir: Path, checkpoints: Path, extra_group: int
) -> None:
    user = sudo_user()
    assert extra_group in user.groups
    hidden = public_dir / "root-only"
    (hidden / "data").mkdir(parents=True)
    hidden.chmod(0o700)  # its subdirectory is 0755, but the user cannot reach it
    mine = public_dir / "mine"
    mine.mkdir()
    os.chown(mine, user.uid, user.gid)
    base = {"name": "job1", "dir": None, "checkpoints": str(checkpoints)}
    asked: list[tuple[str, dict[str, object]]] = [
        ("--dir", {"dir": str(public_dir)}),
        ("--state-dir", {"options": {"state_dir": str(public_dir)}}),
        ("--user root", {"options": {"user": "root"}}),
        ("--user with group 0", {"options": {"user": f"{user.uid}:0"}}),
        ("--rootfs", {"options": {"rootfs": str(public_dir)}}),
        ("--ids", {"options": {"ids": "range"}}),
        ("unreachable volume", {"options": {"volumes": [f"{hidden}/data:/data:ro"]}}),
        ("volume hidden, even whether it exists", {"options": {"volumes": [f"{hidden}/none:/data:ro"]}}),
        ("read-only volume written", {"options": {"volumes": ["/usr/share:/data"]}}),
        ("allowed", {"options": {"user": TEST_USER, "volumes": [f"{mine}:/data", "/usr/share:/share:ro"]}}),
    ]
    # What the user sets in their own environment never reaches kerrickpt: sudo resets it.
    seen = through_sudo(
        public_dir,
        [{**base, "options": {}, **request} for _, request in asked],
        "SUDO_UID=0",
        f"{privilege.CONFIG_ENV}={public_dir}/forged.toml",
    )
    assert Caller(**{**seen["caller"], "groups": tuple(seen["caller"]["groups"])}) == user
    answers = dict(zip((label for label, _ in asked), seen["answers"], strict=True))  # type: ignore[call-overload]
    allowed = answers.pop("allowed")
    for label, answer in answers.items():
        assert answer.get("exit_code") == 22 and answer["error"] == "NotAllowedError", (label, answer)
    assert allowed["directory"] == str(checkpoints / str(user.uid) / "job1")
    assert allowed["pool"] == JOBS.to_dict(), "a user's job takes its range from the site's pool for jobs"
    assert allowed["options"] == {
        "rootfs": HOST_ROOT,
        "user": f"{user.uid}:{user.gid}",
        "volumes": [f"{mine}:/data:rw", "/usr/share:/share:ro"],
        "ids": "host",
        "state_dir": None,
    }
    for made in (checkpoints / str(user.uid), checkpoints / str(user.uid) / "job1"):
        st = made.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o700), made


def test_root_itself_gets_what_it_asks(monkeypatch: pytest.MonkeyPatch, public_dir: Path) -> None:
    monkeypatch.delenv("SUDO_UID", raising=False)
    root = privilege.caller()
    assert (root.uid, root.through_sudo) == (0, False)
    options = RunOptions(rootfs=str(public_dir), user="nobody", volumes=("/root:/data",), state_dir="/x")
    found = privilege.job_request(root, "job1", str(public_dir), options)
    assert found == privilege.JobRequest(public_dir, options)


def test_the_site_configuration_is_root_s_and_its_override_is_root_s_alone(
    monkeypatch: pytest.MonkeyPatch, public_dir: Path, checkpoints: Path
) -> None:
    config = public_dir / "jobs.toml"
    config.write_text(f'checkpoints = "{checkpoints}"\nids = "{JOBS_IDS[0]}:{JOBS_IDS[1]}"\n')
    monkeypatch.setenv(privilege.CONFIG_ENV, str(config))
    root = Caller(0, 0, (0,), "root", through_sudo=False)
    assert privilege.site(root) == Site(checkpoints, isolation.declared_pool(*JOBS_IDS, f"ids of {config}"))
    assert privilege.job_request(root, "job1", None, RunOptions()).directory == checkpoints / "0" / "job1"
    monkeypatch.setattr(privilege, "CONFIG", public_dir / "absent.toml")
    with pytest.raises(NotReadyError, match="absent\\.toml"):
        privilege.site(sudo_user())  # through sudo only the site's own file counts
    config.chmod(0o666)
    with pytest.raises(UntrustedStoreError, match="only root can write"):
        privilege.site(root)


def test_the_shipped_site_configuration_gives_users_jobs_ids_apart_from_the_default_pool(
    monkeypatch: pytest.MonkeyPatch, public_dir: Path, checkpoints: Path
) -> None:
    config = public_dir / "jobs.toml"
    config.write_text((CONTRIB / "jobs.toml").read_text().replace("/shared/kerrickpt/jobs", str(checkpoints)))
    monkeypatch.setenv(privilege.CONFIG_ENV, str(config))
    where = privilege.site(Caller(0, 0, (0,), "root", through_sudo=False))
    assert where.checkpoints == checkpoints and where.ids.ranges == 2048
    assert not where.ids.overlaps(isolation.declared_pool(*isolation.DEFAULT_POOL, "default"))


@pytest.mark.parametrize(
    "ids",
    [None, "", "65536", "0:65536", "1000:65536", f"{JOBS_IDS[0]}:1000", f"{2**32 - 65536}:65536", "a:b", 5],
)
def test_a_site_without_a_sound_pool_for_users_jobs_is_not_set_up(
    monkeypatch: pytest.MonkeyPatch, public_dir: Path, checkpoints: Path, ids: object
) -> None:
    config = public_dir / "jobs.toml"
    declared = "" if ids is None else f"ids = {json.dumps(ids)}\n"
    config.write_text(f'checkpoints = "{checkpoints}"\n{declared}')
    monkeypatch.setenv(privilege.CONFIG_ENV, str(config))
    with pytest.raises(NotReadyError, match=f"{config}.*ids") as refused:
        privilege.site(Caller(0, 0, (0,), "root", through_sudo=False))
    assert refused.value.exit_code == 3


def test_users_jobs_take_ids_that_no_user_has_and_root_s_containers_never_get(checkpoints: Path) -> None:
    user = sudo_user()
    first, _ = isolation.DEFAULT_POOL  # no /etc/subuid entry for root here: the node's pool is the default one
    shared = Site(checkpoints, isolation.declared_pool(first + 5 * RANGE, 2 * RANGE, "ids of the test site"))
    with pytest.raises(NotReadyError, match="ids of the test site overlap the id pool of this node's own containers"):
        privilege.job_request(user, "job1", None, RunOptions(), where=shared)
    assert list(checkpoints.iterdir()) == [], "refused before anything is made"
    inside = Caller(JOBS_IDS[0] + 7, user.gid, (user.gid, JOBS_IDS[0] + 9), "ldapuser", through_sudo=True)
    with pytest.raises(NoIdRangeError) as refused:
        privilege.jobs_pool(inside, Site(checkpoints, JOBS))
    assert f"ldapuser's own uid {JOBS_IDS[0] + 7}, gid {JOBS_IDS[0] + 9}" in str(refused.value)
    assert privilege.jobs_pool(user, Site(checkpoints, JOBS)) == JOBS


@pytest.mark.parametrize("flaw", ["group-writable", "the user's"])
def test_checkpoints_others_control_are_refused(public_dir: Path, checkpoints: Path, flaw: str) -> None:
    user = sudo_user()
    if flaw == "group-writable":
        checkpoints.chmod(0o775)
    else:
        os.chown(checkpoints, user.uid, user.gid)
    with pytest.raises(UntrustedStoreError, match=str(checkpoints)):
        privilege.job_request(user, "job1", None, RunOptions(), where=Site(checkpoints, JOBS))
    assert list(checkpoints.iterdir()) == [], "nothing is made in a directory root does not control"


def test_a_per_uid_directory_someone_else_made_is_refused(checkpoints: Path) -> None:
    user = sudo_user()
    planted = checkpoints / str(user.uid)
    planted.mkdir()
    os.chown(planted, user.uid, user.gid)
    with pytest.raises(UntrustedStoreError, match=str(planted)):
        privilege.job_request(user, "job1", None, RunOptions(), where=Site(checkpoints, JOBS))


def test_a_per_uid_directory_of_root_s_is_made_private(checkpoints: Path) -> None:
    user = sudo_user()
    (checkpoints / str(user.uid)).mkdir(mode=0o755)
    found = privilege.job_request(user, "job1", None, RunOptions(), where=Site(checkpoints, JOBS))
    assert found.directory == checkpoints / str(user.uid) / "job1"
    assert (checkpoints / str(user.uid)).stat().st_mode & 0o777 == 0o700, "a job's images are root's alone"


def archived(confinement: Confinement | None) -> Manifest:
    return Manifest("job1", "2026-01-01T00:00:00+00:00", SOURCE, [], ["sh"], confinement=confinement)


def test_an_archive_restores_for_its_own_user_only(public_dir: Path) -> None:
    user = sudo_user()
    base = 1_000_000  # a range of its own, with the user's own ids kept: a user's job
    own = Confinement(HOST_ROOT, base, base, uid=user.uid, gid=user.gid, groups=user.groups, host_ids=True)
    privilege.check_archive(user, archived(own))
    ranged_group = Confinement(HOST_ROOT, base, base, uid=user.uid, gid=user.gid, groups=(0,), host_ids=True)
    privilege.check_archive(user, archived(ranged_group))  # its group 0 is its range's, not the host's
    stranger = next(g for g in range(1, RANGE) if g not in (user.gid, *user.groups))
    root = Caller(0, 0, (0,), "root", through_sudo=False)
    privilege.check_archive(root, archived(None))  # root restores what it likes
    other = pwd.getpwnam("nobody")
    hidden = public_dir / "root-only"
    hidden.mkdir(mode=0o700)
    mine = {"uid": user.uid, "gid": user.gid, "host_ids": True}
    refused = {
        "another uid": Confinement(HOST_ROOT, base, base, **{**mine, "uid": other.pw_uid}),
        # Restored, it gets a range of its own: whatever its archived map made of uid 0, it is the range's root.
        "root, its range at the user's uid": Confinement(HOST_ROOT, user.uid, user.gid, **{**mine, "uid": 0}),
        "another uid through its id range": Confinement(HOST_ROOT, 100000, 0, uid=user.uid, gid=user.gid),
        "ids of its own, the user's uid mapped elsewhere": Confinement(HOST_ROOT, base, base, uid=user.uid),
        "a group the user is not in": Confinement(HOST_ROOT, base, base, **mine, groups=(stranger,)),
        "not a user's job": None,
        "its own root": Confinement(str(public_dir), base, base, **mine),
        "its lower layer through its map": Confinement(HOST_ROOT, base, base, **mine, idmapped_lower=True),
        "a volume the user cannot reach": Confinement(
            HOST_ROOT, base, base, **mine, volumes=(Volume(str(hidden), "/data", True),)
        ),
    }
    for what, confinement in refused.items():
        with pytest.raises(NotAllowedError, match="not allowed to a user through sudo"):
            privilege.check_archive(user, archived(confinement))
            pytest.fail(f"restored an archive with {what}")
    # Its restore would claim an address of the node network and forward node ports to it.
    networked = dataclasses.replace(
        archived(own), network=Identity("198.19.0.5/16", "0a:58:c6:13:00:05", (Port(80, 8080),))
    )
    with pytest.raises(NotAllowedError, match="has a network of its own"):
        privilege.check_archive(user, networked)


def test_the_shipped_sudo_rule_grants_kerrickpt_job_alone(public_dir: Path) -> None:
    checked = subprocess.run(["visudo", "-cf", str(SUDOERS)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    here = Path(sys.executable).with_name("kerrickpt")  # the installed path does not exist on a test machine
    rule = SUDOERS.read_text().replace(INSTALLED, str(here))
    assert rule != SUDOERS.read_text()

    def may(*argv: str) -> bool:
        asked = ["sudo", "-n", "-l", "-U", TEST_USER, *argv]
        return subprocess.run(asked, capture_output=True, timeout=30).returncode == 0

    with sudo_rule(rule):
        assert may(str(here), "job", "--name", "job1", "--", "true")
        assert not may(str(here), "restore", "job1.tar"), "only `job`"
        assert not may(str(here)), "not kerrickpt's other forms"
        assert not may("-u", TEST_USER, str(here), "job", "--name", "job1"), "as root only"
        assert not may("/bin/sh")


def test_a_file_a_user_names_is_opened_as_that_user(public_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = sudo_user()
    mine = public_dir / "mine"
    mine.mkdir()
    os.chown(mine, user.uid, user.gid)
    hidden = public_dir / "root-only"
    hidden.mkdir(mode=0o700)
    append = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    fd = privilege.open_as(user, f"{mine}/events.jsonl", append)
    try:
        os.write(fd, b"{}\n")
        assert os.fstat(fd).st_uid == user.uid, "created by the user, not by root"
    finally:
        os.close(fd)
    assert (mine / "events.jsonl").read_bytes() == b"{}\n"
    monkeypatch.chdir(mine)
    os.close(privilege.open_as(user, "relative.jsonl", append))
    assert (mine / "relative.jsonl").stat().st_uid == user.uid, "relative to where the user asked from"
    for path in (f"{hidden}/events.jsonl", "/etc/passwd"):
        with pytest.raises(NotAllowedError, match="cannot open"):
            privilege.open_as(user, path, append)
    assert list(hidden.iterdir()) == []
    os.mkfifo(mine / "fifo")
    os.chown(mine / "fifo", user.uid, user.gid)
    with pytest.raises(UsageError, match="No such device"):
        privilege.open_as(user, f"{mine}/fifo", os.O_WRONLY)  # no reader: refused, never waited for


def test_a_user_s_job_is_named_for_its_user_on_the_node_and_a_name_too_long_for_that_is_refused(
    checkpoints: Path,
) -> None:
    user = sudo_user()
    found = privilege.job_request(user, "job1", None, RunOptions(), where=Site(checkpoints, JOBS))
    assert found.container == f"u{user.uid}.job1", "two users' jobs of one name must not meet on a node"
    longest = 63 - len(f"u{user.uid}.")
    assert privilege.job_request(user, "j" * longest, None, RunOptions(), where=Site(checkpoints, JOBS)).container
    with pytest.raises(UsageError, match=f"at most {longest} characters"):
        privilege.job_request(user, "j" * (longest + 1), None, RunOptions(), where=Site(checkpoints, JOBS))
    assert not (checkpoints / str(user.uid) / ("j" * (longest + 1))).exists(), "refused before anything is made"
