"""The built-in example: sample containers on node a, one of them confined (its own root, a non-root user), are moved
to node b and shown going on there."""

from __future__ import annotations

import subprocess
import sys
import time

from kerrickpt.localnodes import Cluster, Node

COUNTER = 'i=0; while :; do i=$((i+1)); echo "count $i"; sleep 0.5; done'
RECORDS = 'i=0; while :; do i=$((i+1)); echo "record $i" >> /var/tmp/records; sleep 0.5; done'


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(node: Node, *args: str) -> None:
    result = node.kerrickpt(*args)
    print(f"[{node.name}]$ kerrickpt {' '.join(args)}")
    print(result.stdout.rstrip())
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        raise SystemExit(result.returncode)


def tail_log(node: Node, name: str) -> None:
    lines = (node.state_dir / "containers" / name / "log").read_text().splitlines()[-3:]
    print("\n".join(f"   [{node.name}] | {line}" for line in lines))


def main() -> None:
    step("two local nodes: network namespaces on a private bridge, each with its own sshd and state")
    with Cluster(2) as cluster:
        a, b = cluster.nodes
        print(f"node a: {a.address}    node b: {b.address}")
        name = "sample"
        step("start a sample container on node a; it counts twice a second")
        show(a, "run", "--name", name, "--memory-limit", "64M", "--", "sh", "-c", COUNTER)
        time.sleep(2)
        show(a, "ps")
        tail_log(a, name)
        step("move it to node b over ssh: pre-flight, freeze, dump, stream, restore, hand-over")
        show(a, "migrate", name, *cluster.migrate_args(b))
        step("node a has nothing left; node b runs it, counting on from where it stopped")
        show(a, "ps")
        time.sleep(2)
        show(b, "ps")
        tail_log(b, name)
        step("checkpoint it on node b into one archive, and see what the archive holds")
        archive = b.workdir / f"{name}.kckpt"
        show(b, "checkpoint", name, "-o", str(archive), "--leave-running")
        show(b, "inspect", str(archive))
        listing = subprocess.run(f"zstd -dc {archive} | tar -t | head -n 5", shell=True, capture_output=True, text=True)
        print(f"$ zstd -dc {archive.name} | tar -t | head -n 5\n{listing.stdout.rstrip()}")
        step("restore a second copy from the archive next to it: same PIDs inside, its own namespaces")
        show(b, "restore", str(archive), "--name", f"{name}-copy")
        show(b, "ps")
        step("a confined container on node a: its own root (the host's, read-only, under a layer of its own), uid 1000")
        show(a, "run", "--name", "job", "--rootfs", "host", "--user", "1000", "--", "sh", "-c", RECORDS)
        time.sleep(2)
        show(a, "ps")
        show(a, "exec", "job", "--", "tail", "-n", "3", "/var/tmp/records")
        step("move it to node b: its layer, with the file it writes, travels in the archive")
        show(a, "migrate", "job", *cluster.migrate_args(b))
        time.sleep(2)
        show(b, "exec", "job", "--", "id", "-u")
        show(b, "exec", "job", "--", "tail", "-n", "3", "/var/tmp/records")
    step("done: both nodes and everything they ran are removed")


if __name__ == "__main__":
    main()
