"""Everything read from an archive or a peer is checked first: random mutations of a manifest (in the
archive's frame and in its index) and of each migration message end in a documented exit code, never a
traceback, and leave nothing behind; the migration pre-flight refuses what the README says it refuses."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pycriu
import pytest
import zstandard

import kerrickpt
from kerrickpt import (
    archive,
    archiveindex,
    archivewriter,
    cgroups,
    compat,
    containers,
    criu,
    node,
    receiver,
    schema,
    transport,
)
from kerrickpt.errors import ArchiveCorruptError, KerrickptError, ProtocolError
from kerrickpt.localnodes import Cluster, kerrickpt_path
from kerrickpt.manifest import VERSION, Manifest
from kerrickpt.migrate import _Live, _preflight
from kerrickpt.migrate import status as target_status
from kerrickpt.restore import _plan as restore_plan
from kerrickpt.stdio import Stdio
from tests.helpers import cgroup_dirs, cli, ipc_keys, unique_name

README = Path(__file__).parent.parent / "README.md"
# The exit codes the README's table documents: the only ones a user may ever see.
DOCUMENTED = {int(code) for code in re.findall(r"^\| (\d+) \|", README.read_text(), re.M)}
SEED = 20261206
# Values of every JSON type, out of every range the schema checks, and unknown names.
ODD = [None, True, False, -1, 0, 2**63, 2**70, -(2**63), 1.5, "", "x", "guest", "../../etc/passwd", "\udcff",
       [], [1], ["x"], {}, {"a": 1}]  # fmt: skip
MUTATIONS = 300


def mutate(rng: random.Random, data: Any) -> Any:
    """A copy of `data` (JSON) with one value somewhere in it dropped or replaced by an odd one."""
    copy = json.loads(json.dumps(data))
    holder: Any = copy
    while True:
        keys = list(holder) if isinstance(holder, dict) else list(range(len(holder)))
        if not keys:
            return ODD[rng.randrange(len(ODD))] if holder is copy else copy
        key = rng.choice(keys)
        if isinstance(holder[key], (dict, list)) and holder[key] and rng.random() < 0.6:
            holder = holder[key]
            continue
        if rng.random() < 0.25:
            del holder[key]
        else:
            holder[key] = rng.choice(ODD)
        return copy


def garble(rng: random.Random, line: bytes) -> bytes:
    """`line` cut short or with one byte changed: what a broken or hostile peer sends."""
    if rng.random() < 0.5:
        return line[: rng.randrange(len(line))]
    at = rng.randrange(len(line))
    return line[:at] + bytes([rng.randrange(256)]) + line[at + 1 :]


def variants(rng: random.Random, message: dict[str, Any], count: int) -> Iterator[bytes]:
    """`count` malformed versions of `message` as JSON: mostly values mutated, some bytes garbled."""
    for _ in range(count):
        if rng.random() < 0.8:
            yield json.dumps(mutate(rng, message)).encode()
        else:
            yield garble(rng, json.dumps(message).encode())


def assert_documented(exc: BaseException) -> None:
    """What a user sees: a KerrickptError with a documented exit code (anything else is a traceback)."""
    assert isinstance(exc, KerrickptError), f"{type(exc).__name__}: {exc} would be a traceback"
    assert exc.exit_code in DOCUMENTED, f"exit code {exc.exit_code} is not in the README: {exc}"


def outcome(fn: Callable[[], object]) -> object:
    """What `fn` returned, or the KerrickptError it raised (checked to be documented)."""
    try:
        return fn()
    except Exception as exc:
        assert_documented(exc)
        return exc


def children() -> set[int]:
    """This test process's children: what a test must not leave running."""
    return {int(p) for t in Path("/proc/self/task").iterdir() for p in (t / "children").read_text().split()}


# --- the manifest ---------------------------------------------------------------------------------------


def full_manifest(source: node.Fingerprint) -> Manifest:
    """A manifest with every field in use: a host-namespace job with SysV objects and a log."""
    process = {"host_pid": 4242, "ns_pid": 4242, "host_ppid": 1, "cmdline": ["job", "run"], "threads": 2,
               "uid": 0, "sid": 4242, "tids": [4242, 4243]}  # fmt: skip
    ipc = {
        "queues": [{"key": 77, "id": 3, "mode": 0o600, "messages": [[1, base64.b64encode(b"hello").decode()]]}],
        "semaphores": [{"key": 78, "id": 4, "mode": 0o600, "values": [1, 0]}],
        "limits": {"msgmax": "8192", "sem": "32000 1024000000 500 32000"},
    }
    return Manifest(
        name="demo", created="2026-12-06T00:00:00+00:00", source=source, processes=[process],
        command=["job", "run"], memory_limit=64 << 20, log_path="/var/lib/kerrickpt/containers/demo/log",
        namespaces=["ipc"], timings={"dump_s": 0.1}, pid_namespace="host", shell_job=False, ipc=ipc,
        compression={"level": 3, "link_mib_s": None},
    )  # fmt: skip


SOURCE = node.Fingerprint("x86_64", "6.1.0", "debian 12", "4.2.1", ("fpu", "sse2"), 4096, "v2", "node-a")


def with_members(manifest: Manifest) -> dict[str, Any]:
    data = manifest.to_dict()
    data["members"] = [{"name": "images/core-1.img", "size": 4, "digest": "0" * 32, "chunks": 0, "chunk_bytes": 0}]
    data["checksum"] = "xxh3_128"
    return data


def check_before_criu(manifest: Manifest) -> None:
    """What a restore does with a manifest before CRIU runs, short of changing this node."""
    compat.compare(manifest.source, SOURCE).explain()
    for route in ("new", "host"):
        outcome(lambda route=route: restore_plan(manifest, route))


def test_the_keys_of_a_containers_output_files_are_read_back() -> None:
    data = with_members(full_manifest(SOURCE))
    data["stdio"] = {"stdout": "file[1b:20c69a]", "stderr": None}
    manifest = Manifest.from_json(json.dumps(data).encode())
    assert manifest.stdio == Stdio(stdout="file[1b:20c69a]")
    assert manifest.to_dict()["stdio"] == data["stdio"]


def test_a_network_carries_its_address_mac_and_ports_only() -> None:
    data = with_members(full_manifest(SOURCE))
    carried = {"address": "198.19.0.5/16", "mac": "0a:58:c6:13:00:05", "ports": [{"host": 8080, "container": 80}]}
    # As issue 15's first step wrote them: with the source node's names, which a restore never used.
    data["network"] = {**carried, "netns": "kpn-0123456789", "veth": "kpn0123456789"}
    data["connections"] = ["198.19.0.5:7000 198.19.0.9:41000", "[::ffff:198.19.0.5]:7000 [::ffff:198.19.0.9]:41001"]
    manifest = Manifest.from_json(json.dumps(data).encode())
    assert manifest.connections == data["connections"]
    assert manifest.to_dict()["network"] == {**carried, "ports": [{"host": 8080, "container": 80, "protocol": "tcp"}]}


def test_random_manifests_are_read_or_refused_as_corrupt() -> None:
    rng = random.Random(SEED)
    base = with_members(full_manifest(SOURCE))
    assert Manifest.from_json(json.dumps(base).encode()).to_dict()["source"] == base["source"]
    refused = 0
    for raw in variants(rng, base, MUTATIONS):
        result = outcome(lambda raw=raw: Manifest.from_json(raw))
        if isinstance(result, Manifest):
            check_before_criu(result)
        else:
            assert isinstance(result, ArchiveCorruptError), result
            refused += 1
    # Most mutations break a type or a range; dropping a field that has a default does not.
    assert refused > MUTATIONS // 2


@pytest.mark.parametrize(
    ("where", "value"),
    [
        # What the issue saw end in a traceback or restore anyway.
        (("memory_limit",), "64M"),
        (("memory_limit",), -1),
        (("source", "criu_version"), 4),
        (("source", "cpu_flags", 0), 7),
        (("source", "kernel"), "6." + "9" * 5000),  # more digits than Python reads as a number
        (("pid_namespace",), "guest"),
        (("processes", 0, "host_pid"), "4242"),
        (("processes", 0, "tids", 0), 0),
        (("members", 0, "size"), -4),
        (("ipc", "limits"), {"shmmax": "1"}),
        (("ipc", "limits", "msgmax"), "8192; reboot"),
        (("ipc", "semaphores", 0, "values", 0), 70000),
        (("ipc", "queues", 0, "messages", 0, 1), "not base64!"),
        (("log_path",), 5),
        (("shell_job",), "no"),
        (("source",), None),
        (("stdio",), {"stdout": "file[1b:2c] --action-script=/tmp/x"}),  # it goes on CRIU's command line
        (("stdio",), {"stderr": 3}),
        (("connections",), ["198.19.0.5:7000 198.19.0.9:41000\x1b]0;owned\x07"]),  # `inspect` prints it
    ],
)
def test_a_wrong_type_or_range_is_a_corrupt_archive(where: tuple[Any, ...], value: object) -> None:
    data = with_members(full_manifest(SOURCE))
    holder = data
    for key in where[:-1]:
        holder = holder[key]
    holder[where[-1]] = value
    with pytest.raises(ArchiveCorruptError, match="manifest"):
        Manifest.from_json(json.dumps(data).encode())


@pytest.mark.parametrize("field", ["name", "source", "processes", "command", "members"])
def test_a_missing_field_is_a_corrupt_archive(field: str) -> None:
    data = with_members(full_manifest(SOURCE))
    del data[field]
    with pytest.raises(ArchiveCorruptError, match="manifest"):
        Manifest.from_json(json.dumps(data).encode())


# --- the manifest inside an archive, in the frame and in the index ---------------------------------------


def rewrite(path: Path, out: Path, frame: bytes | None = None, index: bytes | None = None) -> None:
    """`path` again at `out`, with other manifest bytes in its frame and/or its index."""
    with path.open("rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
        tar = reader.read()  # the first frame only: the index after it is another
    members = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(tar)) as old,
        tarfile.open(fileobj=members, mode="w", format=tarfile.PAX_FORMAT) as new,
    ):
        for info in old:
            data = old.extractfile(info).read()  # type: ignore[union-attr]
            if info.name == "manifest.json":
                data = frame if frame is not None else data
                info.size = len(data)
            new.addfile(info, io.BytesIO(data))
    original = archive.read_index(path)
    assert original is not None
    body = index if index is not None else original.body
    compressed = zstandard.ZstdCompressor().compress(members.getvalue())
    out.write_bytes(compressed + archiveindex.pack(body, original.files, archiveindex.DIGEST(compressed).digest()))


def small_archive(tmp_path: Path, source: node.Fingerprint) -> Path:
    """An archive (of today's format) of made-up images (CRIU cannot restore them) whose manifest has every field."""
    files = {}
    for name, data in {"images/core-1.img": b"core", "images/pages-1.img": b"\0" * 5000, "log": b"hi\n"}.items():
        files[name] = tmp_path / name.replace("/", "_")
        files[name].write_bytes(data)
    path = tmp_path / "base.kckpt"
    archivewriter.write(path, full_manifest(source), files)
    return path


def test_archives_whose_manifest_is_mutated_in_the_frame_or_the_index_are_refused(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    base = small_archive(tmp_path, SOURCE)
    manifest = json.loads(archive.read_index(base).body)  # type: ignore[union-attr]
    assert json.loads(archive.verify(base).to_json()) == manifest
    for count, raw in enumerate(variants(rng, manifest, 90)):
        where = ("frame", "index", "both")[count % 3]
        out = tmp_path / f"m{count}.kckpt"
        rewrite(base, out, frame=raw if where != "index" else None, index=raw if where != "frame" else None)
        # Read as `inspect` and `snapshots list` read it, and checked as `snapshots verify` and `restore` check it.
        read = outcome(lambda out=out: archive.read_manifest(out))
        verified = outcome(lambda out=out: archive.verify(out))
        if isinstance(verified, Manifest):
            assert where == "both" and isinstance(read, Manifest), "a frame and an index that differ are refused"
            check_before_criu(verified)
        else:
            assert verified.exit_code == 6, verified  # type: ignore[attr-defined]
        out.unlink()


@pytest.mark.root
def test_restoring_mutated_archives_ends_in_documented_codes_and_leaves_nothing(
    tmp_path: Path, state_dir: Path
) -> None:
    rng = random.Random(SEED + 2)
    here = node.fingerprint(criu.locate().version)
    base = small_archive(tmp_path, here)
    manifest = json.loads(archive.read_index(base).body)  # type: ignore[union-attr]
    codes: dict[int, int] = {}
    before = children()
    for count, raw in enumerate(variants(rng, manifest, 40)):
        out = tmp_path / f"r{count}.kckpt"
        where = ("frame", "index", "both")[count % 3]
        rewrite(base, out, frame=raw if where != "index" else None, index=raw if where != "frame" else None)
        name = unique_name("fz")
        result = outcome(lambda out=out, name=name: kerrickpt.restore(out, name=name, state_dir=state_dir))
        assert isinstance(result, KerrickptError), "made-up images never restore"
        codes[result.exit_code] = codes.get(result.exit_code, 0) + 1
        assert not containers.Registry(state_dir).all() and not cgroup_dirs(name), f"{name} was left behind"
        out.unlink()
    assert 6 in codes, codes
    assert children() <= before, "a restore left a process behind"


# --- the migration messages --------------------------------------------------------------------------------


class FakeTarget:
    """A target whose every answer is a file: the `ssh` first on PATH is a script that prints it and
    reads whatever comes."""

    def __init__(self, directory: Path) -> None:
        self.answer = directory / "answer"
        self.bin = directory / "bin"
        self.bin.mkdir()
        script = self.bin / "ssh"
        script.write_text(f"#!/bin/sh\ncat '{self.answer}'\nexec cat >/dev/null\n")
        script.chmod(0o755)
        self.link = transport.Link(transport.Target("fake"))

    def says(self, *lines: bytes) -> None:
        self.answer.write_bytes(b"".join(line + b"\n" for line in lines))


def ok(**data: Any) -> dict[str, Any]:
    return {"event": "ok", **data}


READY = json.dumps({"event": "ready"}).encode()
RESTORED = {"event": "restored", "name": "demo", "init_pid": 900, "pid_map": {"1": 900, "2": 901}, "warnings": []}
PREFLIGHT_ANSWER = ok(verdict={"compatible": True, "differences": []}, warnings=["kernel releases differ"],
                      archive_versions=[1, 2, 3, 4], lazy_pages=True)  # fmt: skip
STATUS = ok(state="departed", name="demo")
SUNK = ok(bytes=1 << 20, seconds=0.01)


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTarget]:
    before = children()
    fake = FakeTarget(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.bin}:{os.environ['PATH']}")
    yield fake
    assert children() <= before, "a fake ssh was left running"


def answers(target: FakeTarget, base: dict[str, Any], seed: int, ask: Callable[[], object], *first: bytes) -> None:
    """The source, asking `ask` of a target that answers mutations of `base`: a result or a documented error;
    a malformed answer is a permanent ProtocolError (or, after the end frame, an unknown outcome)."""
    rng = random.Random(seed)
    target.says(*first, json.dumps(base).encode())
    assert not isinstance(outcome(ask), KerrickptError), "the unmutated answer is taken"
    for raw in variants(rng, base, 40):
        target.says(*first, raw)
        result = outcome(ask)
        if isinstance(result, ProtocolError):
            assert not result.transient


def test_malformed_preflight_answers(target: FakeTarget) -> None:
    answers(target, PREFLIGHT_ANSWER, SEED + 3, lambda: _preflight(target.link, {}))


def test_malformed_status_answers(target: FakeTarget) -> None:
    answers(target, STATUS, SEED + 4, lambda: target_status(target.link, "0" * 32))


def test_malformed_link_probe_answers(target: FakeTarget) -> None:
    answers(target, SUNK, SEED + 5, lambda: transport.measure(target.link, 1 << 20))


def test_malformed_ready_events(target: FakeTarget) -> None:
    def ready() -> None:
        with transport.Channel(target.link, ["agent", "receive"]) as channel:
            channel.ready()

    answers(target, {"event": "ready"}, SEED + 6, ready)


def test_a_malformed_answer_after_the_end_frame_leaves_the_outcome_unknown(target: FakeTarget) -> None:
    def conclude() -> schema.Restored:
        return _Live(target.link, ["agent", "receive"]).conclude(target.link, "demo")

    answers(target, RESTORED, SEED + 7, conclude, READY)
    for raw in (b"[]", b"{}", b'{"event": "restored", "name": "demo", "pid_map": {"1": "x"}}', b"\xff"):
        target.says(READY, raw)
        with pytest.raises(kerrickpt.MigrationUnknown):
            conclude()


def frames(payload: bytes, end: bytes) -> io.BytesIO:
    data = transport.FRAME_HEADER.pack(transport.DATA, len(payload)) + payload
    return io.BytesIO(data + transport.FRAME_HEADER.pack(transport.END, len(end)) + end)


def test_malformed_end_frames() -> None:
    rng = random.Random(SEED + 8)
    payload = os.urandom(4096)
    tally = transport._Tally()
    tally.add(payload)
    assert transport.FrameReader(frames(payload, json.dumps(tally.record()).encode())).read() == payload
    for raw in variants(rng, tally.record(), 60):
        result = outcome(lambda raw=raw: transport.FrameReader(frames(payload, raw)).read())
        assert result == payload or isinstance(result, kerrickpt.TransportError)


def test_malformed_migration_ids_name_no_file(state_dir: Path) -> None:
    for bad in ("", "../../containers/x", "0" * 31, "0" * 33, "A" * 32, "0" * 31 + "\n"):
        with pytest.raises(ProtocolError):
            receiver.status(bad, state_dir)
    assert receiver.status("0" * 32, state_dir) == {"state": "absent"}


@pytest.fixture(scope="module")
def cpuinfo(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return criu.cpuinfo_dump(criu.locate(), tmp_path_factory.mktemp("cpuinfo")).read_bytes()


def preflight_request(image: bytes, **changes: Any) -> dict[str, Any]:
    """A pre-flight request for a container of 1 MiB that has /bin/sh open, with `image` as its cpuinfo.img."""
    request = {
        "name": unique_name("pf"),
        "fingerprint": node.fingerprint(criu.locate().version).to_dict(),
        "cpuinfo": base64.b64encode(image).decode(),
        "files": {"/bin/sh": os.stat("/bin/sh").st_size},
        "memory_bytes": 1 << 20,
        "force": False,
    }
    return request | changes


@pytest.mark.root
def test_malformed_preflight_requests_are_answered_with_documented_errors(cpuinfo: bytes, state_dir: Path) -> None:
    rng = random.Random(SEED + 9)
    base = preflight_request(cpuinfo)
    assert "verdict" in receiver.preflight(json.dumps(base).encode(), state_dir)
    for raw in variants(rng, base, 50):
        outcome(lambda raw=raw: receiver.preflight(raw, state_dir))


# --- each pre-flight refusal (README: Migration, step 1) --------------------------------------------------


def refusal(request: dict[str, Any], state_dir: Path) -> KerrickptError:
    with pytest.raises(KerrickptError) as caught:
        receiver.preflight(json.dumps(request).encode(), state_dir)
    return caught.value


@pytest.mark.root
def test_preflight_refuses_a_name_taken(cpuinfo: bytes, start_workload, state_dir: Path) -> None:
    taken = start_workload()
    error = refusal(preflight_request(cpuinfo, name=taken.name), state_dir)
    assert error.exit_code == 9 and taken.name in error.message


@pytest.mark.root
def test_preflight_refuses_an_open_file_that_differs(cpuinfo: bytes, state_dir: Path, tmp_path: Path) -> None:
    present = tmp_path / "data"
    present.write_bytes(b"12345")
    files = {str(present): 4, str(tmp_path / "gone"): 10, "/bin/sh": os.stat("/bin/sh").st_size}
    error = refusal(preflight_request(cpuinfo, files=files), state_dir)
    assert error.exit_code == 7
    assert f"{present} (source: 4 bytes, target: 5)" in error.message and "gone (source: 10 bytes" in error.message
    assert "/bin/sh" not in error.message


@pytest.mark.root
def test_preflight_refuses_without_room_for_twice_the_memory(cpuinfo: bytes, state_dir: Path) -> None:
    error = refusal(preflight_request(cpuinfo, memory_bytes=1 << 60), state_dir)
    assert error.exit_code == 7 and "no room for the images" in error.message


@pytest.mark.root
def test_preflight_refuses_what_criu_cpuinfo_check_refuses(cpuinfo: bytes, state_dir: Path, tmp_path: Path) -> None:
    image = pycriu.images.load(io.BytesIO(cpuinfo))
    entry = image["entries"][0]["x86_entry"][0]
    entry["capability"] = [0xFFFFFFFF] * len(entry["capability"])  # every CPU feature there is
    claimed = io.BytesIO()
    pycriu.images.dump(image, claimed)
    # Even with --force, which the fingerprint's own differences could be passed with.
    request = preflight_request(cpuinfo, cpuinfo=base64.b64encode(claimed.getvalue()).decode(), force=True)
    error = refusal(request, state_dir)
    assert error.exit_code == 7 and "criu cpuinfo check" in error.message


@pytest.mark.root
def test_migrate_refuses_a_target_that_cannot_read_its_archive_version_before_the_freeze(
    target: FakeTarget, start_workload, state_dir: Path
) -> None:
    job = start_workload()
    target.says(json.dumps(PREFLIGHT_ANSWER | {"archive_versions": [1, 2, 3]}).encode())
    with pytest.raises(kerrickpt.NodeIncompatibleError, match=f"writes version {VERSION}") as caught:
        kerrickpt.migrate(job.name, "fake", state_dir=state_dir, level=1)
    assert caught.value.exit_code == 7 and "was not frozen" in caught.value.message
    assert job.status.state == "running"
    assert not cgroups.Cgroup(tuple(Path(p) for p in job.status.cgroup)).freezer.is_frozen()
    job.wait_ticking(job.wait_ticking())  # and counts on
    assert not (state_dir / "migrations").exists() or not list((state_dir / "migrations").iterdir())


@pytest.mark.root
@pytest.mark.parametrize(
    ("where", "value"),
    [(("memory_limit",), "64M"), (("source", "criu_version"), 4), (("source", "cpu_flags", 0), 7),
     (("pid_namespace",), "guest"), (("processes",), None)],
)  # fmt: skip
def test_restore_of_a_real_checkpoint_with_a_bad_manifest_exits_6(
    control: tuple[Path, str], state_dir: Path, tmp_path: Path, where: tuple[Any, ...], value: object
) -> None:
    path, _ = control
    data = json.loads(archive.read_index(path).body)  # type: ignore[union-attr]
    holder = data
    for key in where[:-1]:
        holder = holder[key]
    holder[where[-1]] = value
    bad = tmp_path / "bad.kckpt"
    rewrite(path, bad, frame=json.dumps(data).encode(), index=json.dumps(data).encode())
    name = unique_name("bad")
    result = cli("restore", str(bad), "--name", name, state_dir=state_dir)
    assert result.returncode == 6, result.stderr
    assert "Traceback" not in result.stderr and "manifest" in result.stderr
    assert name not in [c.name for c in kerrickpt.ps(state_dir)] and not cgroup_dirs(name)


@pytest.mark.root
def test_a_real_checkpoint_rewritten_with_its_own_manifest_restores(control: tuple[Path, str], state_dir: Path) -> None:
    result = cli("restore", str(control[0]), "--name", unique_name("same"), state_dir=state_dir)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def control(start_workload, state_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A real checkpoint of a running workload, rewritten with its own manifest: it restores."""
    job = start_workload()
    path = tmp_path / "job.kckpt"
    kerrickpt.checkpoint(job.name, path, state_dir=state_dir, leave_running=True)
    same = tmp_path / "same.kckpt"
    body = archive.read_index(path).body  # type: ignore[union-attr]
    rewrite(path, same, frame=body, index=body)
    return same, job.name


# --- a real target whose kerrickpt answers malformed messages ----------------------------------------------

# The target's kerrickpt, but for one agent command that answers a malformed message instead.
WRAPPER = """#!/bin/sh
if [ "$1 $2" = "agent {op}" ]; then
    cat >/dev/null &
    printf '%s\\n' '{answer}'
    exit 0
fi
exec {real} "$@"
"""


@pytest.mark.root
@pytest.mark.parametrize(
    ("op", "answer"),
    [
        ("preflight", '{"event": "ok", "archive_versions": "4", "warnings": [], "lazy_pages": false}'),
        ("preflight", '{"event": "ok", "archive_versions": [4], "warnings": [7]}'),
        ("preflight", "[]"),
        ("receive", '{"event": "reddy"}'),
    ],
)
def test_a_target_that_answers_malformed_messages_fails_the_migration_before_the_freeze_without_retrying(
    cluster: Cluster, workload: Path, tmp_path: Path, op: str, answer: str
) -> None:
    a, b = cluster.nodes
    wrapper = tmp_path / "kerrickpt"
    wrapper.write_text(WRAPPER.format(op=op, answer=answer, real=kerrickpt_path()))
    wrapper.chmod(0o755)
    name = unique_name("mal")
    started = a.kerrickpt("run", "--name", name, "--", str(workload), "run", *map(str, ipc_keys()))
    assert started.returncode == 0, started.stderr

    result = a.kerrickpt("migrate", name, *cluster.migrate_args(b), "--remote-kerrickpt", str(wrapper), "--json")

    assert result.returncode == 11, result.stderr
    assert json.loads(result.stdout)["error"] == "ProtocolError"
    assert "Traceback" not in result.stderr and "retrying" not in result.stderr
    assert [r["state"] for r in a.json("ps") if r["name"] == name] == ["running"]
    assert not [r for r in b.json("ps") if r["name"] == name]
    assert not (a.state_dir / "migrations").exists() or not list((a.state_dir / "migrations").iterdir())
