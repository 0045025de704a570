"""Owns the archive manifest: what was checkpointed, from where, with which checksums and timings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import xxhash

from kerrickpt import schema, sysvipc
from kerrickpt.confinement import Confinement
from kerrickpt.errors import ArchiveCorruptError
from kerrickpt.network import Identity
from kerrickpt.node import Fingerprint
from kerrickpt.stdio import Stdio

FORMAT = "kerrickpt-archive"
# Version 2 cuts big files into chunk members (see Member); version 3 checksums them with XXH3-128
# and says so up front (members.HEADER); version 4 ends with an index (archiveindex.INDEX_MAGIC) that a
# restore reads first; version 5 may carry a confined container's confinement and writable layer (see
# layer); versions 1 and 2 (sha256), 3 and 4 read the same way. A snapshot whose layer is only what changed
# since its base (`layer_base`) was version 6, so that a kerrickpt that knows no deltas refuses it rather than
# restoring a few files as the whole layer. Version 7 (every archive, a delta or not) ends with digests of
# every byte of the file (see archiveindex.DIGESTED_TAG), which a reader then requires.
VERSION = 7
DIGESTED = 7
READABLE = (1, 2, 3, 4, 5, 6, 7)
NAME = "manifest.json"
LAYER = "layer.tar"  # the member that carries a confined container's file-system layer (see layer)
# How a member's digest is computed, by the name an archive gives it.
CHECKSUMS: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128}


@dataclass(frozen=True)
class Member:
    """One file in the archive with its size and checksum (of the whole file; see Manifest.checksum).

    A file of at most one chunk is one tar member under its own name. A bigger one, whose
    size a stream does not know up front, is `chunks` members `NAME.000000`, `NAME.000001`, ...
    of `chunk_bytes` each but the last.
    """

    name: str
    size: int
    digest: str
    chunks: int = 0
    chunk_bytes: int = 0


@dataclass
class Manifest:
    name: str
    created: str
    source: Fingerprint
    processes: list[dict[str, Any]]
    command: list[str]
    memory_limit: int | None = None
    log_path: str | None = None
    namespaces: list[str] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # "own": the tree had its own PID namespace; "host": it shared the host's (a batch job).
    pid_namespace: str = "own"
    shell_job: bool = False  # its session leader was outside the tree
    ipc: dict[str, Any] | None = None  # the job's SysV objects (host route), see sysvipc.JobIpc
    checksum: str = "sha256"  # what the members' digests are: one of CHECKSUMS
    # zstd level, and the link speed (MiB/s) it was chosen for when a migration chose it.
    compression: dict[str, Any] = field(default_factory=dict)
    # Where in the source's log the archived `log` member starts (see logtail); 0: the whole log.
    log_start: int = 0
    confinement: Confinement | None = None  # its own root and users; the archive carries its layer
    log_external: str | None = None  # CRIU's name for a confined container's log (criuopts.file_key)
    # The layer carried: {"lineage": the layer's id, "index": the digest of its index as carried} (see layerchain).
    layer: dict[str, str] | None = None
    # Set when only what changed is carried: {"snapshot": the base's id in its store, "lineage", "index": the
    # base's `layer` index digest}. Such an archive restores only on top of that base (see layerchain).
    layer_base: dict[str, str] | None = None
    # CRIU's keys of the caller's files that were its fd 1 and 2 (see stdio), external to the images; None: its log.
    stdio: Stdio | None = None
    network: Identity | None = None  # its own network's address, MAC and published ports
    # Its established TCP connections as the dump found them ("LOCAL:PORT PEER:PORT"), carried in the images.
    connections: list[str] = field(default_factory=list)

    @property
    def criu_version(self) -> str:
        return self.source.criu_version

    @property
    def image_bytes(self) -> int:
        return sum(m.size for m in self.members if m.name.startswith("images/"))

    @property
    def layer_bytes(self) -> int:
        """Bytes of the file-system layer a confined container's archive carries (as a tar)."""
        return sum(m.size for m in self.members if m.name == LAYER)

    @property
    def memory_bytes(self) -> int:
        """Bytes of process memory in the images (CRIU's pages-*.img files)."""
        return sum(m.size for m in self.members if m.name.startswith("images/pages-"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["source"] = self.source.to_dict()
        data["confinement"] = self.confinement.to_dict() if self.confinement else None
        data["network"] = self.network.to_dict() if self.network else None
        return {"format": FORMAT, "version": VERSION, "criu_version": self.criu_version, **data}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """The manifest in `raw`, every field checked against schema.Manifest; ArchiveCorruptError if one fails."""
        try:
            data = json.loads(raw)
        except ValueError as exc:  # bad UTF-8 included
            raise ArchiveCorruptError(f"the manifest is unreadable: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArchiveCorruptError("not a kerrickpt archive (the manifest names another format)")
        if type(data.get("version")) is not int or data["version"] not in READABLE:
            raise ArchiveCorruptError(
                f"archive format version {data.get('version')!r} is not supported "
                f"(this kerrickpt reads {', '.join(map(str, READABLE))})"
            )
        if str(data.get("checksum", "sha256")) not in CHECKSUMS:
            raise ArchiveCorruptError(
                f"the archive's checksums are {data['checksum']!r}, which this kerrickpt cannot check"
            )
        checked = schema.from_archive(data, schema.Manifest, "the manifest")
        members = []
        for m in checked.members:
            digest = m.digest or m.sha256  # versions 1 and 2 name the digest after sha256
            if not digest:
                raise ArchiveCorruptError(f"the manifest gives {m.name} no digest")
            members.append(Member(m.name, m.size, digest, m.chunks, m.chunk_bytes))
        ipc = msgspec.to_builtins(checked.ipc) if checked.ipc else None
        if ipc:
            try:
                sysvipc.JobIpc.from_dict(ipc)  # the queues' messages are base64
            except ValueError as exc:
                raise ArchiveCorruptError(f"the manifest's SysV objects are unreadable: {exc}") from exc
        confined = Confinement.from_dict(msgspec.to_builtins(checked.confinement)) if checked.confinement else None
        return cls(
            name=checked.name,
            created=checked.created,
            source=Fingerprint.of(checked.source),
            processes=msgspec.to_builtins(checked.processes),
            command=checked.command,
            memory_limit=checked.memory_limit,
            log_path=checked.log_path,
            namespaces=checked.namespaces,
            members=members,
            timings=checked.timings,
            pid_namespace=checked.pid_namespace,
            shell_job=checked.shell_job,
            ipc=ipc,
            log_start=checked.log_start,
            compression=checked.compression,
            checksum=checked.checksum,
            confinement=confined,
            log_external=checked.log_external,
            layer=msgspec.to_builtins(checked.layer) if checked.layer else None,
            layer_base=msgspec.to_builtins(checked.layer_base) if checked.layer_base else None,
            stdio=Stdio.from_dict(msgspec.to_builtins(checked.stdio)) if checked.stdio else None,
            network=Identity.from_dict(msgspec.to_builtins(checked.network)) if checked.network else None,
            connections=checked.connections,
        )


def is_layer(layer: dict[str, str] | None, wanted: dict[str, str] | None) -> bool:
    """Whether an archive's `layer` (lineage and index digest) is the one a delta's `layer_base` names."""
    return layer is not None and wanted is not None and layer == {k: wanted[k] for k in ("lineage", "index")}
