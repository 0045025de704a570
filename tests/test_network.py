"""Containers with a network of their own (`run --net own`): addresses, published ports, bad input, and TCP
connections kept across checkpoint and restore on one node. Each test's node is a network namespace of its own
(its bridge, veths and iptables rules go with it); its containers use the default subnet, 198.19.0.0/16."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kerrickpt import containers, network
from tests.helpers import KERRICKPT, cli_env, unique_name, wait_for

pytestmark = pytest.mark.root

COUNTER = Path(__file__).parent / "workload" / "counter.py"
PORT = 7000


@dataclass
class Node:
    """A network namespace standing in for a node: kerrickpt and the clients run in it."""

    netns: str
    state_dir: Path

    def enter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

    def kerrickpt(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        argv = [*self.enter(), *KERRICKPT, *args]
        return subprocess.run(argv, capture_output=True, text=True, env=cli_env(self.state_dir, **env), timeout=120)

    def ok(self, *args: str) -> dict[str, object]:
        done = self.kerrickpt(args[0], "--json", *args[1:])
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result

    def addresses(self) -> dict[str, str]:
        """Each container's address, by name (`ps`)."""
        done = self.kerrickpt("ps", "--json")
        assert done.returncode == 0, done.stderr
        return {row["name"]: row["address"] for row in json.loads(done.stdout)}

    def serve(self, name: str, *options: str) -> str:
        """Start the counter server as container `name`; its address."""
        started = self.ok("run", "--name", name, "--net", "own", *options, "--", sys.executable, str(COUNTER),
                          "serve", str(PORT), name)  # fmt: skip
        return str(started["address"]).split("/")[0]

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.netns, *args], capture_output=True, text=True, check=True).stdout

    def nat_rules(self) -> str:
        argv = [*self.enter(), "iptables", "-w", "-t", "nat", "-S"]
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout

    def ask(self, address: str, port: int) -> str:
        """One request to the counter at `address`:`port` from the node: the name that answered."""
        script = (
            "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); "
            "s.sendall(b'1\\n'); print(s.makefile().readline().split()[0])"
        )
        argv = [*self.enter(), sys.executable, "-c", script, address, str(port)]
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


@pytest.fixture
def node(state_dir: Path) -> Iterator[Node]:
    """A node of its own; its containers are killed in it (their rules are its) before it goes."""
    netns = f"kpt-nt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    made = Node(netns, state_dir)
    try:
        made.ip("link", "set", "lo", "up")
        yield made
    finally:
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(subprocess.run, ["ip", "netns", "del", netns], timeout=30)
            if (state_dir / "containers").exists():
                for name in containers.Registry(state_dir).recorded():
                    cleanup.callback(made.kerrickpt, "kill", name)


@dataclass
class Client:
    """The counter's client, talking to a server over one connection from the node."""

    process: subprocess.Popen[str]
    output: Path
    stop: Path

    def answers(self) -> list[int]:
        return [int(n) for n in re.findall(r"^answer (\d+) ", self.output.read_text(), re.M)]

    def wait_more(self, count: int = 5) -> None:
        """Until `count` more answers came; fails at once if the client gave up."""
        before = len(self.answers())
        wait_for(
            lambda: len(self.answers()) >= before + count or self.process.poll() is not None,
            timeout=60,
            what=f"{count} more answers",
        )
        assert self.process.poll() is None, self.output.read_text()[-500:]

    def finish(self) -> list[int]:
        """Stop it; every answer it got, which it checked one by one."""
        self.stop.touch()
        assert self.process.wait(timeout=60) == 0, self.output.read_text()[-500:]
        assert re.search(r"^done \d+$", self.output.read_text(), re.M)
        return self.answers()


@pytest.fixture
def client(node: Node, tmp_path: Path) -> Iterator[Callable[[str], Client]]:
    """Start it with `talk(address)`; it is ended afterwards whatever happened."""
    started: list[Client] = []

    def talk(address: str) -> Client:
        output, stop = tmp_path / "client.out", tmp_path / "client.stop"
        with output.open("w") as out:
            argv = [*node.enter(), sys.executable, str(COUNTER), "talk", address, str(PORT), str(stop)]
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
        started.append(Client(process, output, stop))
        return started[-1]

    yield talk
    for made in started:
        if made.process.poll() is None:
            made.process.kill()
            made.process.wait()


def test_a_connection_survives_checkpoints_and_a_restore_on_the_node(
    node: Node, client: Callable[[str], Client], tmp_path: Path
) -> None:
    name = unique_name("net")
    address = node.serve(name)
    talking = client(address)
    talking.wait_more()

    node.ok("checkpoint", name, "-o", str(tmp_path / "running.kckpt"), "--leave-running")
    talking.wait_more()

    # A checkpoint that fails after the network was locked lets it go: the connection goes on.
    failed = node.kerrickpt("checkpoint", name, "-o", str(tmp_path / "failed.kckpt"),
                            KERRICKPT_FAULT="checkpoint-before-criu:fail")  # fmt: skip
    assert failed.returncode != 0
    talking.wait_more()
    # So does one whose kerrickpt is killed there: its guardian thaws the container and connects it again.
    killed = node.kerrickpt("checkpoint", name, "-o", str(tmp_path / "killed.kckpt"),
                            KERRICKPT_FAULT="checkpoint-before-criu:kill")  # fmt: skip
    assert killed.returncode == -9
    talking.wait_more()

    node.ok("checkpoint", name, "-o", str(tmp_path / "stopped.kckpt"))
    carried = node.ok("inspect", str(tmp_path / "stopped.kckpt"))["network"]
    assert carried["address"] == f"{address}/16"  # type: ignore[index]
    assert name not in node.kerrickpt("ps").stdout
    restored = node.ok("restore", str(tmp_path / "stopped.kckpt"))
    assert restored["name"] == name
    talking.wait_more()

    answers = talking.finish()
    assert answers == list(range(1, len(answers) + 1))  # each checked as it came: none lost, none twice
    assert f"from {name}" in talking.output.read_text()
    assert node.addresses()[name] == f"{address}/16"


def test_a_copy_restored_with_tcp_close_takes_another_address(
    node: Node, client: Callable[[str], Client], tmp_path: Path
) -> None:
    name, copy = unique_name("net"), unique_name("copy")
    address = node.serve(name)
    talking = client(address)
    talking.wait_more()
    node.ok("checkpoint", name, "-o", str(tmp_path / "a.kckpt"), "--leave-running")

    taken = node.kerrickpt("restore", str(tmp_path / "a.kckpt"), "--name", copy)
    assert taken.returncode != 0
    assert f"address {address} is in use on this node (by container {name})" in taken.stderr

    node.ok("restore", str(tmp_path / "a.kckpt"), "--name", copy, "--tcp-close")
    other = node.addresses()[copy].split("/")[0]
    assert other != address
    assert node.ask(other, PORT) == name  # the copy's server, as it was archived
    talking.wait_more()  # the original's connection never saw the copy
    assert talking.finish()


def test_two_containers_listen_on_one_port_and_publish_it(node: Node, tmp_path: Path) -> None:
    first, second = unique_name("a"), unique_name("b")
    first_address = node.serve(first, "--publish", "18080:7000")
    second_address = node.serve(second, "--ip", "198.19.7.7/16", "--publish", "18081:7000/tcp")
    assert second_address == "198.19.7.7"
    assert node.ask(first_address, PORT) == first
    assert node.ask(second_address, PORT) == second
    gateway = str(network.gateway(network.subnet()))
    assert node.ask(gateway, 18080) == first  # the node's ports, from the node itself
    assert node.ask(gateway, 18081) == second

    # A restore on the node publishes its ports again.
    node.ok("checkpoint", first, "-o", str(tmp_path / "first.kckpt"))
    assert "18080" not in node.nat_rules()
    node.ok("restore", str(tmp_path / "first.kckpt"))
    assert node.ask(gateway, 18080) == first

    node.ok("kill", first)
    assert "18080" not in node.nat_rules()
    assert "18081" in node.nat_rules()
    links = node.ip("-o", "link", "show")
    assert network.names(containers.Registry(node.state_dir), first)[1] not in links
    assert network.names(containers.Registry(node.state_dir), first)[0] not in subprocess.check_output(
        ["ip", "netns", "list"], text=True
    )


def test_bad_network_input_is_refused_before_the_container_starts(node: Node) -> None:
    holder = unique_name("holder")
    node.serve(holder, "--ip", "198.19.0.20/16", "--publish", "18090:7000")
    gateway = str(network.gateway(network.subnet()))
    cases = {
        "is in use on this node (by container": ["--net", "own", "--ip", "198.19.0.20/16"],
        "is in use on this node (the node's own)": ["--net", "own", "--ip", f"{gateway}/16"],
        "is outside this node's network": ["--net", "own", "--ip", "198.18.255.5/16"],
        "(its network or broadcast address)": ["--net", "own", "--ip", "198.19.255.255/16"],
        "publishes node port 18090/tcp": ["--net", "own", "--publish", "18090:80"],
        "need a network of the container's own": ["--ip", "198.19.0.30/16"],
        "give HOSTPORT:PORT": ["--net", "own", "--publish", "80"],
    }
    # A node port some program of the node listens on.
    script = "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 18095)); s.listen(); time.sleep(600)"
    program = subprocess.Popen([*node.enter(), sys.executable, "-c", script])
    try:
        wait_for(lambda: _listens(node, 18095), what="the node's own listener")
        cases["node port 18095/tcp is in use on this node"] = ["--net", "own", "--publish", "18095:80"]
        for reason, options in cases.items():
            refused = node.kerrickpt("run", "--name", unique_name("bad"), *options, "--", "sleep", "60")
            assert refused.returncode == 2, (options, refused.stderr)
            assert reason in refused.stderr, (options, refused.stderr)
    finally:
        program.kill()
        program.wait()
    node.ip("link", "add", "kpt-other", "type", "veth", "peer", "name", "kpt-peer")  # no dummy module here
    node.ip("addr", "add", "198.19.200.1/24", "dev", "kpt-other")
    overlapping = node.kerrickpt("run", "--name", unique_name("bad"), "--net", "own", "--", "sleep", "60")
    assert overlapping.returncode == 2
    assert "overlaps this node's own address 198.19.200.1/24 on kpt-other" in overlapping.stderr
    assert list(node.addresses()) == [holder]
    assert len(re.findall(r"^\d+: kpn", node.ip("-o", "link", "show"), re.M)) == 1  # the holder's veth alone


def _listens(node: Node, port: int) -> bool:
    argv = [*node.enter(), "cat", "/proc/net/tcp"]
    table = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    return f":{port:04X} 00000000:0000 0A" in table
