"""Owns the shapes of what kerrickpt reads from an archive, a peer or its own journal, and their typed,
range-checked decoding."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from kerrickpt.confinement import RANGE
from kerrickpt.errors import ArchiveCorruptError, ProtocolError, StateDamagedError, StoreFormatError
from kerrickpt.idmap import LAST

T = TypeVar("T")
# `ids` of a container of `--ids host` as it was at first: all the host's ids, mapped to themselves.
LEGACY_HOST_IDS = (1 << 32) - 1

Count = Annotated[int, msgspec.Meta(ge=0)]
Id = Annotated[int, msgspec.Meta(ge=0, le=LAST)]  # a host or container uid or gid
Pid = Annotated[int, msgspec.Meta(ge=1, le=2**22)]  # the kernel's pid_max is at most 2^22
# What migrate makes (uuid4().hex): it names files on the target, so nothing else may pass.
MIGRATION_ID = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]
CHECKSUMS = Literal["sha256", "xxh3_128"]  # manifest.CHECKSUMS' names
# The per-IPC-namespace limits an archive may set (sysvipc.LIMITS), as the kernel prints them.
IpcLimit = Literal["msgmax", "msgmnb", "msgmni", "sem"]
# compat compares these by their numbers: Python refuses to read an int of more than 4300 digits.
Version = Annotated[str, msgspec.Meta(max_length=256)]
IpcLimitValue = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,19}([ \t]+[0-9]{1,19})*$")]


class Fingerprint(msgspec.Struct, frozen=True):
    arch: str
    kernel: Version
    os_release: str
    criu_version: Version
    cpu_flags: list[str]
    page_size: Annotated[int, msgspec.Meta(ge=1)]
    cgroup_layout: str
    hostname: str = ""


class Process(msgspec.Struct):
    host_pid: Pid
    ns_pid: Pid
    host_ppid: Count
    cmdline: list[str]
    threads: Annotated[int, msgspec.Meta(ge=1)]
    uid: Count
    sid: Count = 0
    tids: list[Pid] = []


class Member(msgspec.Struct):
    name: str
    size: Count
    digest: str = ""
    sha256: str = ""  # what versions 1 and 2 call the digest
    chunks: Count = 0
    chunk_bytes: Count = 0


class Queue(msgspec.Struct):
    key: int
    id: Count
    mode: Count
    messages: list[tuple[Annotated[int, msgspec.Meta(ge=1)], str]] = []  # (type, base64 text)


class Semaphores(msgspec.Struct):
    key: int
    id: Count
    mode: Count
    values: list[Annotated[int, msgspec.Meta(ge=0, le=65535)]] = []


class Ipc(msgspec.Struct):
    queues: list[Queue] = []
    semaphores: list[Semaphores] = []
    limits: dict[IpcLimit, IpcLimitValue] = {}


class Volume(msgspec.Struct):
    source: str
    target: str
    read_only: bool = False


class Confinement(msgspec.Struct):
    """See confinement.Confinement."""

    rootfs: str
    uid_base: Id
    gid_base: Id
    ids: Annotated[int, msgspec.Meta(ge=1)] = RANGE
    uid: Id = 0
    gid: Id = 0
    groups: list[Id] = []
    volumes: list[Volume] = []
    env: dict[str, str] = {}
    workdir: str = "/"
    idmapped_lower: bool = False  # absent from archives made before idmapped lower layers
    host_ids: bool = False  # absent from archives made before its user kept the host's ids

    def __post_init__(self) -> None:
        if self.ids > RANGE:
            raise ValueError(
                "it maps every id to itself (`--ids host` before its user alone kept the host's ids): its root was "
                "host root as files go, and a restore of it could open any file of the node's; kerrickpt neither "
                "restores nor keeps it"
                if self.ids == LEGACY_HOST_IDS
                else f"a container has {RANGE} ids or less"
            )
        if max(self.uid_base, self.gid_base) + self.ids - 1 > LAST:
            raise ValueError(f"its id range runs past host id {LAST}, the last there is")
        if self.host_ids and self.idmapped_lower:
            raise ValueError("a container whose user keeps the host's ids sees its lower layer as it is")


Digest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Lineage = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]


class Layer(msgspec.Struct):
    """See manifest.Manifest.layer."""

    lineage: Lineage
    index: Digest


class LayerBase(msgspec.Struct):
    """See manifest.Manifest.layer_base."""

    snapshot: Annotated[str, msgspec.Meta(pattern=r"^\d{8}T\d{6}\.\d{3}Z$")]
    lineage: Lineage
    index: Digest


# CRIU's name for an open file (criuopts.fd_key): it goes on CRIU's command line.
FileKey = Annotated[str, msgspec.Meta(pattern=r"^file\[[0-9a-f]{1,16}:[0-9a-f]{1,16}\]$")]


class Stdio(msgspec.Struct):
    """See stdio.Stdio."""

    stdout: FileKey | None = None
    stderr: FileKey | None = None


PortNumber = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class Port(msgspec.Struct):
    """See netports.Port."""

    host: PortNumber
    container: PortNumber
    protocol: Literal["tcp", "udp"] = "tcp"


class Network(msgspec.Struct):
    """See network.Identity. (Archives of issue 15's first step also name the source node's network namespace and
    veth: unknown fields, ignored.)"""

    address: Annotated[str, msgspec.Meta(pattern=r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")]
    mac: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")]
    ports: list[Port] = []


# An established TCP connection as netports writes it, "LOCAL:PORT PEER:PORT" (IPv6 in brackets): `inspect` prints
# it, so nothing else (a terminal's escape sequences) may pass.
_ENDPOINT = r"(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-f:.]{2,45}\]):\d{1,5}"
Connection = Annotated[str, msgspec.Meta(pattern=f"^{_ENDPOINT} {_ENDPOINT}$", max_length=120)]


class Manifest(msgspec.Struct):
    """An archive's manifest.json; `format` and `version` are checked before (see manifest.Manifest.from_json)."""

    name: str
    created: str
    source: Fingerprint
    processes: list[Process]
    command: list[str]
    members: list[Member]
    memory_limit: Count | None = None
    log_path: str | None = None
    namespaces: list[str] = []
    timings: dict[str, float] = {}
    pid_namespace: Literal["own", "host"] = "own"  # "host": it shared the host's (a batch job)
    shell_job: bool = False
    ipc: Ipc | None = None
    checksum: CHECKSUMS = "sha256"
    compression: dict[str, int | float | None] = {}
    log_start: Annotated[int, msgspec.Meta(ge=0, le=1 << 50)] = 0  # see logtail
    confinement: Confinement | None = None
    log_external: str | None = None  # CRIU's name for the log of a confined container (criuopts.file_key)
    layer: Layer | None = None
    layer_base: LayerBase | None = None
    stdio: Stdio | None = None  # absent from archives made before a container's output could be its caller's
    network: Network | None = None  # its own network (absent: it shared its node's)
    connections: list[Connection] = []  # see manifest.Manifest.connections


# The migration protocol: the source's requests and the target's answers (JSON, one line each).


class PreflightRequest(msgspec.Struct):
    name: str
    fingerprint: Fingerprint
    cpuinfo: str  # base64 of the source's cpuinfo.img
    files: dict[str, Count]  # path -> size of every regular file the container has open
    memory_bytes: Count
    force: bool = False
    confinement: Confinement | None = None  # a confined container's: what the target must offer it
    network: Network | None = None  # a container's own network, which the target must take (see network.reserve)
    net_remap: bool = False  # the target gives it an address of its own: only its published ports are checked
    migration_id: MIGRATION_ID | None = None  # held for it: what the target claims (a source from before sends none)


class Answer(msgspec.Struct):
    """What `agent preflight`, `agent status` and `agent sink` answer when they succeed."""

    event: Literal["ok"]


class PreflightAnswer(Answer):
    # A kerrickpt from before version 3 did not say.
    archive_versions: list[int] = msgspec.field(default_factory=lambda: [1, 2])
    warnings: list[str] = []
    lazy_pages: bool = False
    lazy_pages_confined: bool = False  # see node.lazy_pages_confined
    network_migration: bool = False  # it carries a container's network of its own (see network.reserve)
    confined_network: bool = False  # and a confined container's, which CRIU restores (see network.create_unplaced)


class Restored(msgspec.Struct):
    """The receiver's answer once the container runs on the target."""

    event: Literal["restored"]
    name: str
    pid_map: dict[Pid, Pid]  # in the container -> on the target's host
    warnings: list[str] = []
    address: str | None = None  # its own network's address there (a kerrickpt before migrations of one: absent)
    # From connecting its own network there to this answer (a kerrickpt before it, or no network of its own: absent).
    answered_after_s: float | None = None


class Status(Answer):
    """The target's word on a migration (receiver.status)."""

    state: Literal["running", "exited", "departed", "in-progress", "failed", "abandoned", "absent"]
    name: str = ""
    why: str = ""
    log_tail: str = ""


class End(msgspec.Struct):
    """A stream's END frame: the size and digest of its DATA bytes."""

    bytes: Count
    xxh3_128: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]


class Sunk(Answer):
    """What `agent sink` measured."""

    bytes: Count
    seconds: Annotated[float, msgspec.Meta(ge=0)]


# The source's journal of a migration under way (migrate.Journal): recover acts on it.


class JournaledLink(msgspec.Struct):
    target: str
    ssh_options: list[str]
    remote_kerrickpt: str


class Journal(msgspec.Struct):
    id: MIGRATION_ID
    link: JournaledLink
    scratch: str
    started: str = ""


def from_archive(data: object, kind: type[T], what: str) -> T:
    """`data` (JSON text, or what json.loads gave) as `kind`; ArchiveCorruptError naming `what` if it is not."""
    try:
        return _convert(data, kind)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ArchiveCorruptError(f"{what} is unreadable: {exc}") from exc


def from_peer(data: object, kind: type[T], who: str) -> T:
    """`data` as `kind`; ProtocolError naming `who` (the peer) if it is not."""
    try:
        return _convert(data, kind)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ProtocolError(f"{who} sent a malformed message: {exc}") from exc


def from_state(data: object, kind: type[T], what: str) -> T:
    """`data` as `kind`; StateDamagedError naming `what` (a record of this node's) if it is not."""
    try:
        return _convert(data, kind)
    except (msgspec.ValidationError, ValueError) as exc:
        raise StateDamagedError(f"{what} is damaged ({exc})") from exc


def recorded_confinement(data: object) -> dict[str, Any]:
    """A container record's confinement, checked as an archive's is; ValueError if kerrickpt does not keep it."""
    try:
        return msgspec.to_builtins(_convert(data, Confinement))  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise ValueError(f"its confinement: {exc}") from None


def header_version(head: object, fmt: str, readable: int, label: str, kind: str) -> int:
    """The format version of `head`, the JSON header of `label` (`kind`, format `fmt`); ValueError if it is not one
    or gives no version, StoreFormatError if a newer kerrickpt wrote it (of a version above `readable`)."""
    if not isinstance(head, dict) or head.get("format") != fmt:
        raise ValueError(f"not {kind}")
    version = head.get("version")
    if type(version) is not int:
        raise ValueError(f"it gives no format version: {version!r}")
    if version > readable:
        raise StoreFormatError(
            f"{label} is {kind} of format version {version}; this kerrickpt reads up to {readable}: "
            "use the kerrickpt that wrote it, or a newer one"
        )
    return version


def migration_id(text: object) -> str:
    """`text` if it is a migration id as migrate makes them; ProtocolError if not."""
    return from_peer(text, MIGRATION_ID, "the source")  # type: ignore[arg-type]


def _convert(data: object, kind: Any) -> Any:
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = json.loads(bytes(data))  # ValueError, bad UTF-8 included
    # JSON's keys are strings: str_keys lets a dict keyed by PIDs be read from them.
    return msgspec.convert(data, kind, str_keys=True)
