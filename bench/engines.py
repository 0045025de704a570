"""Owns the store-engine benchmark (issue 16): snapshots of one container kept in borg and in fixed-chunk stores.

A container whose memload rewrites PERCENT% of its pages between snapshots is checkpointed
N times (`checkpoint --leave-running --level 3`, what `snapshot` writes); each archive's
images are unpacked and stored, in turn, in every engine: a plain kerrickpt archive (the
baseline), borg repositories (its default content-defined chunker, a finer one, a fixed
one), a minimal content-addressed store of our own with fixed-size chunks, and kerrickpt's
deduplicating store itself, plain and encrypted (what `snapshot` does after the freeze: the
images cut into chunks as they are written; read back as `restore --store` reads it). Each store
and each read-back runs as a process of its own, whose wall time and peak RSS (VmHWM) are
taken, so borg and our engine are measured alike. After the snapshots, the first and the
last are read back in full from every engine and compared with the images they came from.
With `--kind redis` the container is a real program instead: Debian's redis-server, filled
with keys of 1000-byte values until its used_memory reaches --heap, PERCENT% of its keys
(picked at random) set to new values between snapshots (bench/redisload.py); its data is
checked by redis's own digest after the snapshots.

    PYTHONPATH=. .venv/bin/python -m bench.engines --snapshots 6 --heap 256M
    PYTHONPATH=. .venv/bin/python -m bench.engines --kind redis --heap 1G

borg comes from Debian (`apt-get install borgbackup`, 1.2.4 on Debian 12), built with its C
extensions: PyPI has no wheel of it for this machine, only its source, which needs a compiler
and the -dev packages of libacl, lz4, zstd, xxhash and OpenSSL. Either way the bench drives it
by its command line, as a store engine would.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
import zstandard

from bench.lab import CHURN_PERCENT, MIB, REDIS, SAMPLE_INTERVAL, BenchError, Lab, kerrickpt, removed, timeout_for
from kerrickpt import archive, archivewriter, cgroups, keys, sources
from kerrickpt.store import Store

LEVEL = 3  # what `snapshot` writes its archives with
BORG_COMPRESSION = f"zstd,{LEVEL}"  # borg's default is lz4: zstd 3 compares like with like
BATCH = 8 * MIB  # what our store reads, hashes and compresses at once
SNAPSHOTS = 6
THREADS = os.cpu_count() or 2  # our store hashes and compresses on every core, as the archive writer compresses
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Engine:
    """One way to keep the snapshots: `kind` archive, borg or cas, and its parameters."""

    name: str
    kind: str
    chunker: str = ""  # borg's --chunker-params
    chunk: int = 0  # our store's chunk size
    encryption: str = "none"  # borg's --encryption
    dictionary: bool = False  # our store: chunks compressed with a zstd dictionary trained on the first snapshot
    sealed: bool = False  # kerrickpt's store: encrypted (`snapshots init --encrypt`)


ENGINES = {
    e.name: e
    for e in (
        Engine("archive", "archive"),
        Engine("borg-cdc2m", "borg", chunker="buzhash,19,23,21,4095"),  # borg's default: 2 MiB on average
        Engine("borg-cdc64k", "borg", chunker="buzhash,12,23,16,4095"),  # 64 KiB on average, 4 KiB at least
        Engine("borg-fixed64k", "borg", chunker="fixed,65536"),
        Engine("borg-fixed4k", "borg", chunker="fixed,4096"),
        Engine("borg-cdc2m-enc", "borg", chunker="buzhash,19,23,21,4095", encryption="repokey-blake2"),
        Engine("cas4k", "cas", chunk=4096),
        Engine("cas4k-dict", "cas", chunk=4096, dictionary=True),
        Engine("cas16k", "cas", chunk=16384),
        Engine("cas64k", "cas", chunk=65536),
        Engine("cas1m", "cas", chunk=MIB),
        Engine("kerrickpt", "kerrickpt"),
        Engine("kerrickpt-enc", "kerrickpt", sealed=True),
    )
}
DEFAULT = (
    "archive",
    "borg-cdc2m",
    "borg-cdc64k",
    "borg-fixed64k",
    "borg-fixed4k",
    "cas4k",
    "cas4k-dict",
    "cas16k",
    "cas64k",
    "cas1m",
    "kerrickpt",
    "kerrickpt-enc",
)
SERIES = "bench"  # the container's name in kerrickpt's store


class Cas:
    """A minimal content-addressed store of fixed-size chunks (a file's offsets: page-aligned for CRIU's images).

    Each chunk is named by its sha256 (the CPU has SHA instructions) and kept once, zstd-compressed
    on its own, appended to the snapshot's pack file; `index` maps a digest to its pack, offset and
    length; a snapshot is a recipe (each file's name, size and chunk digests), written last.
    No encryption, no pruning, no locking: enough to measure what fixed chunks dedup and cost.
    """

    RECORD = struct.Struct("<32sIQI")  # digest, pack, offset, compressed length
    DICT_BYTES = 112 << 10  # zstd's own default dictionary size
    DICT_SAMPLES = 4096  # chunks it is trained on, spread over the first snapshot's biggest file

    def __init__(self, root: Path, chunk: int, dictionary: bool = False) -> None:
        self.root = root
        self.chunk = chunk
        self.dictionary = dictionary
        self.zdict: zstandard.ZstdCompressionDict | None = None
        with contextlib.suppress(FileNotFoundError):
            self.zdict = zstandard.ZstdCompressionDict((root / "dict").read_bytes())
        for sub in ("packs", "snapshots"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.index: dict[bytes, tuple[int, int, int]] = {}
        with contextlib.suppress(FileNotFoundError):
            data = (root / "index").read_bytes()
            for digest, pack, offset, length in self.RECORD.iter_unpack(data):
                self.index[digest] = (pack, offset, length)
        self.local = threading.local()
        self.pool = concurrent.futures.ThreadPoolExecutor(THREADS)

    def _compress(self, chunks: list[memoryview]) -> list[bytes]:
        if not hasattr(self.local, "zstd"):
            self.local.zstd = zstandard.ZstdCompressor(level=LEVEL, dict_data=self.zdict)
        return [self.local.zstd.compress(c) for c in chunks]

    def _train(self, images: Path) -> None:
        """The dictionary, from chunks spread evenly over the biggest file (the process memory)."""
        biggest = max((p for p in images.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        chunks = biggest.stat().st_size // self.chunk
        samples = []
        with biggest.open("rb") as fh:
            for i in range(0, chunks, max(1, chunks // self.DICT_SAMPLES)):
                samples.append(os.pread(fh.fileno(), self.chunk, i * self.chunk))
        self.zdict = zstandard.train_dictionary(self.DICT_BYTES, samples, threads=-1)
        (self.root / "dict").write_bytes(self.zdict.as_bytes())

    def _digests(self, chunks: list[memoryview]) -> list[bytes]:
        return [hashlib.sha256(c).digest() for c in chunks]

    def _spread(self, items: list[Any]) -> list[list[Any]]:
        """`items` in as many runs, in order, as there are threads."""
        size = -(-len(items) // THREADS) or 1
        return [items[i : i + size] for i in range(0, len(items), size)]

    def store(self, images: Path, name: str) -> None:
        if self.dictionary and self.zdict is None:
            self._train(images)
        pack_no = len(list((self.root / "packs").iterdir()))
        recipe = bytearray()
        records = bytearray()
        with (self.root / "packs" / f"{pack_no:08d}").open("wb") as pack:
            for path in sorted(p for p in images.rglob("*") if p.is_file()):
                digests: list[bytes] = []
                with path.open("rb") as fh:
                    while batch := fh.read(BATCH):
                        view = memoryview(batch)
                        chunks = [view[i : i + self.chunk] for i in range(0, len(view), self.chunk)]
                        found = [d for ds in self.pool.map(self._digests, self._spread(chunks)) for d in ds]
                        new: dict[bytes, memoryview] = {}
                        for digest, chunk in zip(found, chunks, strict=True):
                            if digest not in self.index and digest not in new:
                                new[digest] = chunk
                        packed = self.pool.map(self._compress, self._spread(list(new.values())))
                        for digest, data in zip(new, (p for ps in packed for p in ps), strict=True):
                            self.index[digest] = (pack_no, pack.tell(), len(data))
                            records += self.RECORD.pack(digest, pack_no, pack.tell(), len(data))
                            pack.write(data)
                        digests += found
                rel = str(path.relative_to(images)).encode()
                size = path.stat().st_size
                recipe += struct.pack("<HQI", len(rel), size, len(digests)) + rel + b"".join(digests)
            pack.flush()
            os.fsync(pack.fileno())
        with (self.root / "index").open("ab") as fh:
            fh.write(records)
            os.fsync(fh.fileno())
        tmp = self.root / "snapshots" / f".{name}"
        tmp.write_bytes(zstandard.ZstdCompressor(level=LEVEL).compress(bytes(recipe)))
        tmp.rename(self.root / "snapshots" / name)

    def read(self, name: str, dest: Path) -> None:
        recipe = zstandard.ZstdDecompressor().decompress((self.root / "snapshots" / name).read_bytes())
        packs: dict[int, int] = {}
        dctx = zstandard.ZstdDecompressor(dict_data=self.zdict)
        pos = 0
        try:
            while pos < len(recipe):
                length, size, count = struct.unpack_from("<HQI", recipe, pos)
                pos += struct.calcsize("<HQI")
                rel = recipe[pos : pos + length].decode()
                pos += length
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    for i in range(count):
                        pack, offset, clen = self.index[recipe[pos + 32 * i : pos + 32 * (i + 1)]]
                        if pack not in packs:
                            packs[pack] = os.open(self.root / "packs" / f"{pack:08d}", os.O_RDONLY)
                        archive.write_all(fd, memoryview(dctx.decompress(os.pread(packs[pack], clen, offset))))
                finally:
                    os.close(fd)
                pos += 32 * count
                if target.stat().st_size != size:
                    raise BenchError(f"{rel} read back from the store has the wrong size")
        finally:
            for fd in packs.values():
                os.close(fd)


def worker(job: dict[str, Any]) -> None:
    """One store or read-back of an archive or of our store, in a process of its own (see `timed`)."""
    engine, verb, repo = ENGINES[job["engine"]], job["verb"], Path(job["repo"])
    if engine.kind == "archive":
        path = repo / f"{job['name']}.kckpt"
        if verb == "store":
            images = Path(job["images"])
            files = {f"images/{p.name}": p for p in images.iterdir()}
            archivewriter.write(path, archive.read_manifest(Path(job["manifest"])), files, level=LEVEL)
        else:
            archive.extract(path, Path(job["dest"]))
    elif engine.kind == "kerrickpt":
        key = keys.load(Path(job["key"])) if engine.sealed else None
        store = Store(repo, key)
        if verb == "store":
            with store.lock(SERIES), store.taking_in(SERIES, level=LEVEL) as intake:
                images = Path(job["images"])
                files = {f"images/{p.name}": p for p in images.iterdir()}
                intake.writer.commit_files(archive.read_manifest(Path(job["manifest"])), files)
        else:
            snap = store.list(SERIES)[int(job["name"].removeprefix("snap-"))]  # its id is its time: the n-th
            with sources.opened(snap.path, key) as source:
                source.extract(Path(job["dest"]))
    elif verb == "store":
        Cas(repo, engine.chunk, engine.dictionary).store(Path(job["images"]), job["name"])
    else:
        Cas(repo, engine.chunk, engine.dictionary).read(job["name"], Path(job["dest"]) / "images")


def timed(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run `argv` to completion: its wall time and its peak RSS (MiB), sampled as lab.PeakMemory does.

    VmHWM, not wait4's ru_maxrss: a process keeps across exec the peak of the one that forked it,
    and subprocess forks this process, whose RSS holds what it last read.
    """
    started = time.monotonic()
    peak_kib = 0
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        while process.poll() is None:
            with contextlib.suppress(OSError, StopIteration):
                status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
                peak_kib = max(peak_kib, int(next(x for x in status if x.startswith("VmHWM:")).split()[1]))
            time.sleep(SAMPLE_INTERVAL)
        wall = time.monotonic() - started
        if process.returncode != 0:
            errors.seek(0)
            said = errors.read().decode(errors="replace")[-2000:]
            raise BenchError(f"{' '.join(argv)} exited {process.returncode}:\n{said}")
    return wall, peak_kib / 1024


@dataclass
class Bench:
    """The repositories of one run, under `work`, and what was measured."""

    work: Path
    engines: list[Engine]
    rows: list[dict[str, Any]] = field(default_factory=list)
    freed = 0  # bytes of plain archives removed: only the first and the latest are kept (for the read-back)

    def repo(self, engine: Engine) -> Path:
        return self.work / "repos" / engine.name

    def borg_env(self, engine: Engine) -> dict[str, str]:
        return {
            **os.environ,
            "BORG_BASE_DIR": str(self.work / "borg-home" / engine.name),  # its cache and keys: not the user's
            "BORG_PASSPHRASE": "bench",
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        }

    def setup(self) -> None:
        for engine in self.engines:
            if engine.kind == "borg":
                if not shutil.which("borg"):
                    raise BenchError("the borg engines need borg: apt-get install borgbackup")
                timed(["borg", "init", "--encryption", engine.encryption, str(self.repo(engine))],
                      env=self.borg_env(engine))  # fmt: skip
            else:
                self.repo(engine).mkdir(parents=True)
            if engine.kind == "kerrickpt":
                Store.deduplicating(self.repo(engine), keys.create(self.key(engine)) if engine.sealed else None)

    def key(self, engine: Engine) -> Path:
        return self.work / f"{engine.name}.key"

    def run(self, engine: Engine, verb: str, name: str, **paths: Path) -> tuple[float, float]:
        repo = self.repo(engine)
        if verb == "read":
            (paths["dest"] / "images").mkdir(parents=True, mode=0o700)
        if engine.kind == "borg":
            if verb == "store":
                argv = ["borg", "create", "--compression", BORG_COMPRESSION, "--chunker-params", engine.chunker,
                        "--files-cache", "disabled", f"{repo}::{name}", "."]  # fmt: skip
                return timed(argv, cwd=paths["images"], env=self.borg_env(engine))
            return timed(["borg", "extract", f"{repo}::{name}"], cwd=paths["dest"] / "images",
                         env=self.borg_env(engine))  # fmt: skip
        job = {
            "engine": engine.name,
            "verb": verb,
            "repo": str(repo),
            "name": name,
            "key": str(self.key(engine)),
            **{k: str(v) for k, v in paths.items()},
        }
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return timed([sys.executable, "-m", "bench.engines", "--worker", json.dumps(job)], env=env)

    def store_all(self, index: int, images: Path, manifest: Path) -> None:
        """Snapshot `index` into every engine, in an order that turns with each snapshot (a noisy moment is shared)."""
        turn = index % len(self.engines)
        for engine in self.engines[turn:] + self.engines[:turn]:
            wall, rss = self.run(engine, "store", f"snap-{index}", images=images, manifest=manifest)
            if engine.kind == "archive" and index >= 2:  # a plain archive is a full copy: it may go once measured
                previous = self.repo(engine) / f"snap-{index - 1}.kckpt"
                self.freed += previous.stat().st_size
                previous.unlink()
            size = tree_size(self.repo(engine)) + (self.freed if engine.kind == "archive" else 0)
            self.rows.append({"snapshot": index, "engine": engine.name, "verb": "store", "s": wall, "rss_mib": rss,
                              "size_bytes": size})  # fmt: skip

    def read_all(self, index: int, original: Path) -> None:
        """Snapshot `index` read back from every engine, checked against the images it was stored from."""
        expected = digests(original)
        for engine in self.engines:
            dest = self.work / f"read-{engine.name}-{index}"
            wall, rss = self.run(engine, "read", f"snap-{index}", dest=dest)
            if digests(dest / "images") != expected:
                raise BenchError(f"snapshot {index} read back from {engine.name} differs from its images")
            shutil.rmtree(dest)
            self.rows.append({"snapshot": index, "engine": engine.name, "verb": "read", "s": wall, "rss_mib": rss})


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def digests(images: Path) -> dict[str, str]:
    return {p.name: xxhash.xxh3_128(p.read_bytes()).hexdigest() for p in images.iterdir() if p.is_file()}


def summary(rows: list[dict[str, Any]], engines: list[Engine]) -> list[dict[str, Any]]:
    """Per engine: store growth per snapshot after the first, store and read time, peak RSS, each against the
    plain archive of the same snapshot (medians over the snapshots after the first)."""
    stores = {(r["engine"], r["snapshot"]): r for r in rows if r["verb"] == "store"}
    reads = {(r["engine"], r["snapshot"]): r for r in rows if r["verb"] == "read"}
    snapshots = sorted({s for _, s in stores})
    read_back = sorted({s for _, s in reads})
    out = []
    for engine in engines:
        name = engine.name
        full = [stores[("archive", s)]["size_bytes"] - (stores[("archive", s - 1)]["size_bytes"] if s else 0)
                for s in snapshots]  # fmt: skip
        grown = [stores[(name, s)]["size_bytes"] - (stores[(name, s - 1)]["size_bytes"] if s else 0)
                 for s in snapshots]  # fmt: skip
        later = snapshots[1:]
        out.append({
            "engine": name,
            "first_x": grown[0] / full[0],
            "growth_x": statistics.median(grown[s] / full[s] for s in later) if later else None,
            "total_x": sum(grown) / full[0],  # the store after N snapshots, in full archives
            "store_s": statistics.median(stores[(name, s)]["s"] for s in later) if later else None,
            "store_x": statistics.median(stores[(name, s)]["s"] / stores[("archive", s)]["s"] for s in later)
            if later else None,
            "read_s": {s: reads[(name, s)]["s"] for s in read_back},
            "read_x": {s: reads[(name, s)]["s"] / reads[("archive", s)]["s"] for s in read_back},
            "store_rss_mib": max(stores[(name, s)]["rss_mib"] for s in snapshots),
            "read_rss_mib": max((reads[(name, s)]["rss_mib"] for s in read_back), default=None),
        })  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'engine':<15} {'1st x':>6} {'growth x':>9} {'total x':>8} {'store s':>8} {'store x':>8} "
             f"{'read x (first, last)':>21} {'RSS store':>10} {'RSS read':>9}"]  # fmt: skip
    for r in rows:
        reads = ", ".join(f"{v:.2f}" for _, v in sorted(r["read_x"].items()))
        lines.append(f"{r['engine']:<15} {r['first_x']:>6.3f} {r['growth_x'] or 0:>9.3f} {r['total_x']:>8.2f} "
                     f"{r['store_s'] or 0:>8.2f} {r['store_x'] or 0:>8.2f} {reads:>21} "
                     f"{r['store_rss_mib']:>10.0f} {r['read_rss_mib'] or 0:>9.0f}")  # fmt: skip
    return "\n".join(lines)


def measure(
    lab: Lab, mib: int, kind: str, snapshots: int, engines: list[Engine], churn_at: tuple[int, int]
) -> tuple[Bench, bool]:
    """Snapshots of one workload stored in every engine, then the first and last read back from each; and whether
    the workload's memory was still as it wrote it after all the snapshots."""
    job = lab.start(mib, kind, churn=churn_at)
    limit = timeout_for(mib)
    with removed(job.node, job.name), lab.scratch("engines") as work:
        bench = Bench(work, engines)
        bench.setup()
        kept: dict[int, Path] = {}
        for index in range(snapshots):
            if index:
                job.churn(mib)
            taken = work / f"taken-{index}.kckpt"
            kerrickpt(job.node, "checkpoint", job.name, "-o", str(taken), "--leave-running", "--level", str(LEVEL),
                      timeout=limit)  # fmt: skip
            unpacked = work / f"unpacked-{index}"
            unpacked.mkdir(mode=0o700)
            archive.extract(taken, unpacked)
            print(f"snapshot {index + 1}/{snapshots}: storing", file=sys.stderr, flush=True)
            bench.store_all(index, unpacked / "images", taken)
            if index in (0, snapshots - 1):
                kept[index] = unpacked
            else:
                shutil.rmtree(unpacked)
            taken.unlink()
        for index, unpacked in kept.items():
            print(f"reading back snapshot {index + 1}", file=sys.stderr, flush=True)
            bench.read_all(index, unpacked / "images")
        return bench, job.verify(mib)


def case(lab: Lab, mib: int, kind: str) -> tuple[dict[str, float], dict[str, bool]]:
    """The `stores` case of bench/run: the DEFAULT engines, SNAPSHOTS snapshots, CHURN_PERCENT% scattered pages."""
    engines = [ENGINES[name] for name in DEFAULT]
    bench, ok = measure(lab, mib, kind, SNAPSHOTS, engines, (CHURN_PERCENT, 1))
    metrics: dict[str, float] = {}
    for row in summary(bench.rows, engines):
        at = f"store.{row['engine']}"
        metrics |= {f"{at}.first_x": row["first_x"], f"{at}.growth_x": row["growth_x"],
                    f"{at}.store_x": row["store_x"], f"{at}.read_last_x": row["read_x"][SNAPSHOTS - 1],
                    f"{at}.store_rss_mib": row["store_rss_mib"], f"{at}.read_rss_mib": row["read_rss_mib"]}  # fmt: skip
    return metrics, {"store (the workload after its snapshots)": ok}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--snapshots", type=int, default=SNAPSHOTS, help="snapshots in a row (default: %(default)s)")
    parser.add_argument("--heap", default="256M", help="the workload's memory (default: %(default)s)")
    parser.add_argument("--kind", default="heap", choices=("heap", "mixed", REDIS),
                        help="workload kind: memload's heap or mixed, or redis-server (default: heap)")  # fmt: skip
    parser.add_argument("--churn", type=int, default=CHURN_PERCENT,
                        help="percent of pages (redis: keys) rewritten each time (default: %(default)s)")  # fmt: skip
    parser.add_argument("--run-pages", type=int, default=1,
                        help="they are rewritten in runs of this many pages (default 1: scattered)")  # fmt: skip
    parser.add_argument("--engines", default=",".join(DEFAULT), help=f"of: {', '.join(ENGINES)} (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=Path("engines-results.json"), help="where to write the JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        names = args.engines.split(",")
        if unknown := [n for n in names if n not in ENGINES]:
            parser.error(f"unknown engine: {', '.join(unknown)}")
        args.engines = [ENGINES[n] for n in ("archive", *(n for n in names if n != "archive"))]
        args.mib = cgroups.parse_size(args.heap) // MIB
        if args.snapshots < 2 or args.mib < 1 or not 0 < args.churn <= 100 or args.run_pages < 1:
            parser.error("--snapshots at least 2, --heap at least 1M, --churn 1 to 100, --run-pages at least 1")
        if args.kind == REDIS and args.run_pages != 1:
            parser.error("--kind redis rewrites whole keys: no --run-pages")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    with Lab() as lab:
        bench, ok = measure(lab, args.mib, args.kind, args.snapshots, args.engines, (args.churn, args.run_pages))
    rows = summary(bench.rows, args.engines)
    config = {"snapshots": args.snapshots, "mib": args.mib, "kind": args.kind, "churn_percent": args.churn,
              "run_pages": args.run_pages, "command": " ".join(["python -m bench.engines", *argv])}  # fmt: skip
    args.json.write_text(json.dumps({"config": config, "summary": rows, "samples": bench.rows}, indent=2) + "\n")
    print(table(rows))
    print(f"\nx: against the plain kerrickpt archive of the same snapshot (zstd {LEVEL}); JSON: {args.json}")
    if not ok:
        print("the workload's memory was NOT as it wrote it after the snapshots", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
