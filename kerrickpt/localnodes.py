"""Owns local test nodes: network namespaces on this machine, each with its own sshd, state and cgroup parent.

The migration tests and the built-in example move containers between such nodes.
Addresses come from 198.18.0.0/15, the range set aside for benchmarking: the nodes' own from a 198.18.X.0/24, and
their containers' (`run --net own`) from 198.19.X.0/24, one layer-2 segment the nodes share (standing in for a
LAN), on which each node has a gateway and a part of the subnet to hand out of its own (see netsettings).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kerrickpt import cgroups, containers, netsettings, testmode

SSHD = "/usr/sbin/sshd"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SEGMENT = "lan0"  # the segment's bridge in the switch, and each node's interface on it
POOL_START, POOL_PREFIX = 64, 28  # node N hands out the containers' addresses .64+16N to .79+16N
LAN_HOST = 254  # the segment's address for clients in the switch (a machine on the LAN)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def kerrickpt_path() -> str:
    """The kerrickpt command installed beside this Python (the project's .venv)."""
    return str(Path(sys.executable).with_name("kerrickpt"))


@dataclass
class Node:
    name: str
    netns: str
    address: str
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def cgroup_parent(self) -> str:
        return f"kerrickpt-{self.netns}"

    def env(self) -> dict[str, str]:
        """What makes a kerrickpt process belong to this node."""
        return {
            containers.STATE_ENV: str(self.state_dir),
            cgroups.PARENT_ENV: self.cgroup_parent,
            **self.extra_env,
        }

    def kerrickpt(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run kerrickpt on this node (in its network namespace, with its state)."""
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", kerrickpt_path(), *args],
            env={**os.environ, **self.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def json(self, *args: str) -> Any:
        result = self.kerrickpt(*args, "--json")
        if result.returncode != 0:
            raise RuntimeError(f"kerrickpt {' '.join(args)} on {self.name} failed: {result.stderr}")
        return json.loads(result.stdout)

    def start_sshd(self) -> None:
        config = self.workdir / "sshd_config"
        env = " ".join(f"{k}={v}" for k, v in {**self.env(), "PATH": f"{Path(kerrickpt_path()).parent}:{PATH}"}.items())
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.address}",
                    f"HostKey {self.workdir / 'host_key'}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.workdir.parent / 'client_key.pub'}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    *([f"AcceptEnv {' '.join(testmode.HOOKS)}"] if testmode.ENV in self.extra_env else []),
                    f"SetEnv {env}",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        log = (self.workdir / "sshd.log").open("ab")
        self.sshd = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()

    def stop_sshd(self) -> None:
        if self.sshd is not None:
            self.sshd.kill()
            self.sshd.wait()
            self.sshd = None


class Cluster:
    """Two or more nodes on one private bridge, with ssh keys made for this run.

    With `test_mode`, the nodes' kerrickpt runs in test mode (see testmode.py): its test hooks act,
    and their sshd takes them from a migrating source.
    """

    def __init__(self, count: int = 2, *, start_sshd: bool = True, test_mode: bool = False) -> None:
        self.id = uuid.uuid4().hex[:6]
        self.workdir = Path(tempfile.mkdtemp(prefix=f"kerrickpt-nodes-{self.id}-"))
        self.test_env = testmode.write_marker(self.workdir / "test-mode") if test_mode else {}
        self.switch = f"kpt-{self.id}-sw"
        subnet = random.randrange(0, 256)
        self.segment = ipaddress.IPv4Network(f"198.19.{subnet}.0/24")
        self.nodes: list[Node] = []
        try:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.workdir / "client_key"))
            _sh("ip", "netns", "add", self.switch)
            _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            _sh("ip", "-n", self.switch, "link", "add", SEGMENT, "type", "bridge")
            _sh("ip", "-n", self.switch, "addr", "add", f"{self.lan_address}/24", "dev", SEGMENT)
            _sh("ip", "-n", self.switch, "link", "set", SEGMENT, "up")
            known = []
            for index in range(count):
                node = self._add_node(index, f"198.18.{subnet}.{index + 1}")
                known.append(f"{node.address} {(node.workdir / 'host_key.pub').read_text().strip()}")
                if start_sshd:
                    node.start_sshd()
            (self.workdir / "known_hosts").write_text("\n".join(known) + "\n")
            if start_sshd:
                for node in self.nodes:
                    self.wait_for_sshd(node)
        except BaseException:
            self.close()
            raise

    def _add_node(self, index: int, address: str) -> Node:
        name = "abcdefgh"[index]
        pool = f"{self.segment[POOL_START + 16 * index]}/{POOL_PREFIX}"
        node = Node(
            name=name,
            netns=f"kpt-{self.id}-{name}",
            address=address,
            workdir=self.workdir / name,
            extra_env={
                **self.test_env,
                netsettings.SUBNET_ENV: str(self.segment),
                netsettings.GATEWAY_ENV: str(self.segment[index + 1]),
                netsettings.POOL_ENV: pool,
                netsettings.SEGMENT_ENV: SEGMENT,
            },
        )
        node.workdir.mkdir(mode=0o700)
        self.nodes.append(node)
        _sh("ip", "netns", "add", node.netns)
        self._plug(node, "br0", f"v{self.id}{name}", "eth0")
        _sh("ip", "-n", node.netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _sh("ip", "-n", node.netns, "link", "set", "eth0", "up")
        _sh("ip", "-n", node.netns, "link", "set", "lo", "up")
        # Its end of the segment: the node's kerrickpt joins it to its bridge with the first --net own container.
        self._plug(node, SEGMENT, f"l{self.id}{name}", SEGMENT)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(node.workdir / "host_key"))
        return node

    def _plug(self, node: Node, bridge: str, outside: str, inside: str) -> None:
        """A veth from the switch's `bridge` (its end there `outside`, up) into `node` (its end there `inside`)."""
        _sh("ip", "link", "add", outside, "netns", self.switch, "type", "veth", "peer", "name", inside,
            "netns", node.netns)  # fmt: skip
        _sh("ip", "-n", self.switch, "link", "set", outside, "master", bridge, "up")

    @property
    def lan_address(self) -> ipaddress.IPv4Address:
        """The switch's address on the segment: a client there stands for a machine on the LAN."""
        return self.segment[LAN_HOST]

    def ssh_options(self) -> list[str]:
        return [
            f"IdentityFile={self.workdir / 'client_key'}",
            f"UserKnownHostsFile={self.workdir / 'known_hosts'}",
            "StrictHostKeyChecking=yes",
            "ConnectTimeout=5",
        ]

    def migrate_args(self, target: Node) -> list[str]:
        """`kerrickpt migrate` options that reach `target` with this cluster's keys."""
        args = ["--to", f"root@{target.address}", "--remote-kerrickpt", kerrickpt_path()]
        for option in self.ssh_options():
            args += ["--ssh-option", option]
        return args

    def wait_for_sshd(self, node: Node, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["nsenter", f"--net=/run/netns/{node.netns}", "ssh", "-o", "BatchMode=yes",
                 *[a for o in self.ssh_options() for a in ("-o", o)], f"root@{node.address}", "true"],
                capture_output=True,
                timeout=10,
            )  # fmt: skip
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"sshd of node {node.name} did not come up: {(node.workdir / 'sshd.log').read_text()}")

    def close(self) -> None:
        """Kill every container the nodes run, then sshd, namespaces and files; each step even if one fails."""
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(shutil.rmtree, self.workdir, ignore_errors=True)
            cleanup.callback(subprocess.run, ["ip", "netns", "del", self.switch], capture_output=True, timeout=30)
            for node in self.nodes:
                cleanup.callback(subprocess.run, ["ip", "netns", "del", node.netns], capture_output=True, timeout=30)
                cleanup.callback(node.stop_sshd)
                cleanup.callback(self._remove_containers, node)

    @staticmethod
    def _remove_containers(node: Node) -> None:
        """Every container of the node, then any cgroup left under its parent (a restore cut short)."""
        if (node.state_dir / "containers").exists():
            registry = containers.Registry(node.state_dir)
            for container in registry.all():
                containers.remove(registry, container)
        for root in cgroups.detect().roots():
            parent = root / node.cgroup_parent
            if parent.is_dir():
                cgroups.remove_tree(cgroups.Cgroup((parent,)))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
