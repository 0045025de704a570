"""Containers with a network of their own (`run --net own`): addresses, published ports, bad input, and TCP
connections kept across checkpoint and restore on one node, for confined containers too (their own root and
users, the server running as a user). Each test's node is a network namespace of its own (its bridge, veths and
iptables rules go with it); its containers use the default subnet, 198.19.0.0/16."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.lab import redis_server
from kerrickpt import arp, containers, netsettings, network
from tests.helpers import (
    CONFINED,
    CONFINED_USER,
    COUNTER,
    KERRICKPT,
    USER_PYTHON,
    Client,
    cli_env,
    finished,
    uid_inside,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.root

PORT = 7000
# Each test of a connection runs for a plain container and for a confined one, whose server runs as a user.
KINDS = pytest.mark.parametrize("kind", [(), CONFINED], ids=["plain", "confined"])


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

    def ok(self, *args: str, **env: str) -> dict[str, object]:
        done = self.kerrickpt(args[0], "--json", *args[1:], **env)
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result

    def addresses(self) -> dict[str, str]:
        """Each container's address, by name (`ps`)."""
        return {name: row["address"] for name, row in self.rows().items()}

    def rows(self) -> dict[str, dict[str, object]]:
        """Each container's row of `ps`, by name."""
        done = self.kerrickpt("ps", "--json")
        assert done.returncode == 0, done.stderr
        return {row["name"]: row for row in json.loads(done.stdout)}

    def serves_as(self, name: str) -> int:
        """The uid container `name`'s server runs as, inside."""
        return uid_inside(int(str(self.rows()[name]["init_pid"])))

    def serve(self, name: str, *options: str, redis: bool = False) -> str:
        """Start the counter server (which says its name, see `ask`), or redis-server, as container `name`; its
        address."""
        server = redis_server(PORT) if redis else [USER_PYTHON, str(COUNTER), "serve", str(PORT), name]
        started = self.ok("run", "--name", name, "--net", "own", *options, "--", *server)
        return str(started["address"]).split("/")[0]

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.netns, *args], capture_output=True, text=True, check=True).stdout

    def nat_rules(self) -> str:
        argv = [*self.enter(), "iptables", "-w", "-t", "nat", "-S"]
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout

    def bridge_rules(self) -> str:
        """The node's ebtables nat table, where the port filters live (see portfilter)."""
        argv = [*self.enter(), "ebtables-save", "-t", "nat"]
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout

    def answering(self, address: str) -> arp.Answers:
        """Who answers an ARP probe for `address`, sent from the node network's bridge."""
        script = (
            "import json,sys; from kerrickpt import arp; print(json.dumps(arp.probe(sys.argv[1], sys.argv[2]).replies))"
        )
        argv = [*self.enter(), sys.executable, "-c", script, netsettings.DEFAULT_BRIDGE, address]
        done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
        return arp.Answers(json.loads(done.stdout), arp.PROBES)

    def inside(self, name: str, *argv: str) -> None:
        """Run `argv` in container `name` (as its root: `exec` of a confined container without --user)."""
        done = self.kerrickpt("exec", name, "--", *argv)
        assert done.returncode == 0, done.stderr

    def ask(self, address: str, port: int) -> str:
        """One request to the counter at `address`:`port` from the node: the name that answered."""
        script = (
            "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); "
            "s.sendall(b'1\\n'); print(s.makefile().readline().split()[0])"
        )
        argv = [*self.enter(), sys.executable, "-c", script, address, str(port)]
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    def redis(self, address: str, *command: str) -> str:
        """redis-cli's answer to `command` from the redis at `address`:PORT, asked from the node."""
        argv = [*self.enter(), "redis-cli", "-h", address, "-p", str(PORT), *command]
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


@pytest.fixture
def client(node: Node, tmp_path: Path) -> Iterator[Callable[[str], Client]]:
    """Start it with `talk(address)`; it is ended afterwards whatever happened."""
    started: list[Client] = []

    def talk(address: str) -> Client:
        started.append(Client.start(node.enter(), address, PORT, tmp_path))
        return started[-1]

    yield talk
    for made in started:
        made.end()


def _talking(node: Node, client: Callable[[str], Client], *options: str) -> tuple[str, str, Client]:
    """A redis-server in a container of its own network (with `options` of `run`), and a client talking to it: its
    name, address and the client, which has had answers already."""
    name = unique_name("net")
    address = node.serve(name, *options, redis=True)
    talking = client(address)
    talking.wait_more()
    return name, address, talking


@KINDS
def test_a_connection_survives_checkpoints_and_a_restore_on_the_node(
    node: Node, client: Callable[[str], Client], tmp_path: Path, kind: tuple[str, ...]
) -> None:
    name, address, talking = _talking(node, client, *kind)
    user = CONFINED_USER if kind else 0
    assert node.serves_as(name) == user
    # Another redis listening on the same port, its own client talking to it all along: what is done to the first
    # never touches its connection.
    _, _, beside = _talking(node, client, *kind)

    taken = node.ok("checkpoint", name, "-o", str(tmp_path / "running.kckpt"), "--leave-running")
    talking.wait_more()
    timings = taken["timings"]
    assert isinstance(timings, dict)
    # Cut off once frozen, connected again before the thaw: the network lock lies within the freeze.
    assert 0 < timings["network_lock_s"] < timings["frozen_s"]

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
    carried = node.ok("inspect", str(tmp_path / "stopped.kckpt"))
    assert carried["network"]["address"] == f"{address}/16"  # type: ignore[index]
    assert [c.split()[0] for c in carried["connections"]] == [f"{address}:{PORT}"]  # type: ignore[union-attr]
    shown = node.kerrickpt("inspect", str(tmp_path / "stopped.kckpt")).stdout
    assert f"network:   its own: {address}/16" in shown and "1 established TCP connections carried" in shown
    assert name not in node.kerrickpt("ps").stdout
    restored = node.ok("restore", str(tmp_path / "stopped.kckpt"))
    assert restored["name"] == name
    talking.wait_more()

    for redis in (talking, beside):
        answers = redis.finish()
        assert answers == list(range(1, len(answers) + 1))  # each checked as it came: none lost, none twice
    assert node.addresses()[name] == f"{address}/16"
    assert node.serves_as(name) == user


@KINDS
def test_a_copy_restored_with_tcp_close_takes_another_address(
    node: Node, client: Callable[[str], Client], tmp_path: Path, kind: tuple[str, ...]
) -> None:
    name, address, talking = _talking(node, client, *kind)
    copy = unique_name("copy")
    before = len(talking.answers())
    node.ok("checkpoint", name, "-o", str(tmp_path / "a.kckpt"), "--leave-running")

    taken = node.kerrickpt("restore", str(tmp_path / "a.kckpt"), "--name", copy)
    assert taken.returncode == 2
    assert f"address {address} is in use on this node (by container {name})" in taken.stderr

    node.ok("restore", str(tmp_path / "a.kckpt"), "--name", copy, "--tcp-close")
    other = node.addresses()[copy].split("/")[0]
    assert other != address
    # The copy is the archived server: it holds the original client's counter as the checkpoint found it (past the
    # answers that client had before), and counts on from there.
    (key,) = node.redis(other, "--scan", "--pattern", "talk:*").split()
    archived = int(node.redis(other, "GET", key))
    assert before <= archived <= len(talking.answers())
    assert node.redis(other, "INCR", key) == str(archived + 1)
    client(other).wait_more()  # listening at its new address
    assert f"lladdr {network.mac_of(ipaddress.IPv4Address(other))} " in node.ip("neigh", "show", other)  # its own MAC
    talking.wait_more()  # the original's connection never saw the copy
    assert talking.finish()


@pytest.mark.parametrize("kind", [("--rootfs", "host"), ()], ids=["confined", "plain"])
def test_a_containers_root_cannot_answer_for_another_address_or_mac(node: Node, kind: tuple[str, ...]) -> None:
    """Its root has CAP_NET_ADMIN over its eth0 (a confined container's user namespace owns its network namespace):
    whatever address or MAC it gives it, no frame it sends as another leaves its port (see portfilter)."""
    neighbour, spoofer = unique_name("neighbour"), unique_name("spoofer")
    theirs = node.serve(neighbour)
    # redis, not the counter: a confined container's /tmp is its own, where a checkout under /tmp is not
    mine = node.serve(spoofer, *kind, redis=True)  # run as its root
    their_mac = network.mac_of(ipaddress.IPv4Address(theirs))
    free = "198.19.0.77"
    for address in (theirs, free):
        node.inside(spoofer, "ip", "addr", "add", f"{address}/16", "dev", "eth0")
    neighbours = node.answering(theirs)
    assert (neighbours.macs, neighbours.doubled()) == ({their_mac}, set())
    assert node.answering(free).macs == set()
    assert node.ask(theirs, PORT) == neighbour
    assert node.redis(mine, "ECHO", spoofer) == spoofer  # its own address works as before (the neighbour is no redis)

    # With the neighbour's MAC, nothing it sends leaves (its answers for its own address neither), and the bridge
    # goes on sending the neighbour's frames to the neighbour.
    node.inside(spoofer, "ip", "link", "set", "eth0", "address", their_mac)
    assert node.answering(mine).macs == set()
    neighbours = node.answering(theirs)
    assert (neighbours.macs, neighbours.doubled()) == ({their_mac}, set())
    assert node.ask(theirs, PORT) == neighbour

    chain = network.names(containers.Registry(node.state_dir), spoofer)[0].upper()
    assert f":{chain} " in node.bridge_rules()
    node.ok("kill", spoofer)
    assert chain not in node.bridge_rules()


def test_two_containers_listen_on_one_port_and_publish_it(node: Node, tmp_path: Path) -> None:
    first, second = unique_name("a"), unique_name("b")
    first_address = node.serve(first, "--publish", "18080:7000")
    second_address = node.serve(second, "--ip", "198.19.7.7/16", "--publish", "18081:7000/tcp")
    assert second_address == "198.19.7.7"
    assert node.ask(first_address, PORT) == first
    assert node.ask(second_address, PORT) == second
    gateway = "198.19.0.1"  # the default subnet's first address
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
    gateway = "198.19.0.1"  # the default subnet's first address
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
        # A container with its own root and users is refused alike.
        for reason, options in [*cases.items(), *((r, [*CONFINED, *o]) for r, o in cases.items())]:
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


# A CRIU action script (given through CRIU's own $CRIU_CONFIG_FILE) that stops CRIU's dump once it has dumped,
# its sockets still in TCP repair: it writes CRIU's PID, then waits until CRIU is gone (the test kills it).
HANG = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0
echo $PPID > {marker}
for _ in $(seq 2400); do
    grep -qs '^State:[[:space:]]*[^Z]' /proc/$PPID/status || exit 0
    sleep 0.05
done
"""


@pytest.mark.parametrize("mode", [["--leave-running"], []], ids=["leave-running", "ending"])
def test_a_checkpoint_whose_criu_is_killed_mid_dump_leaves_the_container_reachable(
    node: Node, tmp_path: Path, mode: list[str]
) -> None:
    name = unique_name("net")
    address = node.serve(name)
    veth = network.names(containers.Registry(node.state_dir), name)[1]
    marker, script, config = tmp_path / "criu.pid", tmp_path / "hang.sh", tmp_path / "criu.conf"
    script.write_text(HANG.format(marker=marker))
    script.chmod(0o700)
    config.write_text(f"action-script {script}\n")
    argv = [*node.enter(), *KERRICKPT, "checkpoint", name, "-o", str(tmp_path / "a.kckpt"), *mode]
    env = cli_env(node.state_dir, CRIU_CONFIG_FILE=str(config), KERRICKPT_DUMP_TIMEOUT="120")
    checkpoint = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: marker.exists() and marker.read_text().strip(), timeout=60, what="CRIU at post-dump")
        # Dumped, its sockets in repair: cut off (no packet taken that the archive lacks), --leave-running too.
        assert "bridge_slave state disabled " in node.ip("-d", "link", "show", "dev", veth)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        _, err = finished(checkpoint, 120)
    finally:
        if checkpoint.poll() is None:
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(marker.read_text()), signal.SIGKILL)
            checkpoint.kill()
            checkpoint.wait()
    assert checkpoint.returncode in (5, 17), err  # failed, thawed; or left frozen, CRIU's code perhaps inside
    if checkpoint.returncode == 17:
        assert node.ok("recover", name)["outcome"] == "resumed"
    assert "bridge_slave state forwarding " in node.ip("-d", "link", "show", "dev", veth)
    # No lock of CRIU's left in the container's network: it answers a new connection.
    assert node.ask(address, PORT) == name
    assert "CRIU" not in subprocess.run(
        ["ip", "netns", "exec", network.names(containers.Registry(node.state_dir), name)[0], "iptables", "-w", "-S"],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip


@pytest.mark.parametrize(
    "cut",
    # As a guardian that could not connect it again leaves it: its port disabled, the link up; and as a cut-off of
    # an older kerrickpt left it: the link down.
    [["bridge", "link", "set", "dev", "VETH", "state", "0"], ["ip", "link", "set", "VETH", "down"]],
    ids=["port-disabled", "link-down"],
)
def test_a_container_cut_off_but_running_is_recovered(node: Node, cut: list[str]) -> None:
    name = unique_name("net")
    address = node.serve(name)
    veth = network.names(containers.Registry(node.state_dir), name)[1]
    subprocess.run([*node.enter(), *(veth if word == "VETH" else word for word in cut)], check=True, timeout=30)
    assert node.ok("recover", name)["outcome"] == "resumed"
    assert "bridge_slave state forwarding " in node.ip("-d", "link", "show", "dev", veth)
    assert node.ask(address, PORT) == name
    refused = node.kerrickpt("recover", name)
    assert refused.returncode == 2
    assert "neither frozen nor cut off its network" in refused.stderr


def test_a_container_restored_but_never_connected_is_checkpointed_and_removed(node: Node, tmp_path: Path) -> None:
    name = unique_name("net")
    address = node.serve(name)
    node.ok("checkpoint", name, "-o", str(tmp_path / "a.kckpt"))
    # Restored and recorded, its kerrickpt killed before connecting it: its veth is down, which is cut off already.
    killed = node.kerrickpt("restore", str(tmp_path / "a.kckpt"), KERRICKPT_FAULT="restore-after-save:kill")
    assert killed.returncode == -9, killed.stderr
    veth = network.names(containers.Registry(node.state_dir), name)[1]
    assert "state DOWN" in node.ip("link", "show", "dev", veth)
    # A checkpoint cuts it off before the dump and again before it removes it: neither refuses a link that is down.
    node.ok("checkpoint", name, "-o", str(tmp_path / "b.kckpt"))
    assert name not in node.addresses()
    killed = node.kerrickpt("restore", str(tmp_path / "b.kckpt"), KERRICKPT_FAULT="restore-after-save:kill")
    assert killed.returncode == -9, killed.stderr
    assert "state DOWN" in node.ip("link", "show", "dev", veth)
    # A checkpoint of it killed inside the freeze: its guardian connects it, setting its veth up, and thaws it.
    killed = node.kerrickpt("checkpoint", name, "-o", str(tmp_path / "c.kckpt"),
                            KERRICKPT_FAULT="checkpoint-before-criu:kill")  # fmt: skip
    assert killed.returncode == -9
    assert node.ask(address, PORT) == name


def test_net_remap_of_a_container_sharing_the_nodes_network_is_refused_before_the_target_is_asked(
    node: Node,
) -> None:
    name = unique_name("hostnet")
    node.ok("run", "--name", name, "--", "sleep", "600")
    # This target does not exist: the refusal comes before anything is asked of it.
    refused = node.kerrickpt("migrate", name, "--to", "root@198.18.255.254", "--net-remap")
    assert refused.returncode == 2, refused.stderr
    assert "shares its node's network, so it has no address of its own to change" in refused.stderr
    assert [row["state"] for row in json.loads(node.kerrickpt("ps", "--json").stdout)] == ["running"]


def test_gc_removes_what_an_abandoned_run_with_its_own_network_left(node: Node) -> None:
    name = unique_name("net")
    options = ["--net", "own", "--ip", "198.19.0.9/16", "--publish", "18100:7000"]
    died = node.kerrickpt("run", "--name", name, *options, "--", "sleep", "600",
                          KERRICKPT_FAULT="run-before-save:kill")  # fmt: skip
    assert died.returncode == -9
    netns, veth = network.names(containers.Registry(node.state_dir), name)
    assert "KPN-" in node.nat_rules()
    assert "KPN-" in node.bridge_rules()
    # Its namespace gone by other means (as after a reboot, with the node's iptables rules saved and restored):
    # its rules are still found and go.
    subprocess.run(["ip", "netns", "del", netns], check=True, timeout=30)
    listed = node.ok("gc", "--dry-run")
    assert any(row["kind"] == "container" for row in listed["removed"]), listed  # type: ignore[union-attr]
    node.ok("gc")
    assert "KPN-" not in node.nat_rules()
    assert "KPN-" not in node.bridge_rules()
    assert veth not in node.ip("-o", "link", "show")
    # Its address and node port are free again.
    assert node.serve(unique_name("again"), *options[2:]) == "198.19.0.9"


def test_claims_of_containers_that_are_gone_are_taken_and_collected(node: Node) -> None:
    node.serve(unique_name("first"))  # makes the node network and its claims directory
    claims_dir = node.state_dir / network.DIRECTORY
    (claims_dir / "address-198.19.0.3").write_text('{"container": "gone"}')
    (claims_dir / "tcp-18110").write_text('{"container": "gone"}')
    (claims_dir / ".claim-999999999-1-1").write_text("")  # half written by a run that died
    listed = node.ok("gc", "--dry-run")["removed"]
    stale = {Path(row["path"]).name for row in listed if row["kind"] == "network"}  # type: ignore[union-attr]
    assert stale == {"address-198.19.0.3", "tcp-18110", ".claim-999999999-1-1"}
    # A run takes a stale claim over rather than skipping it.
    assert node.serve(unique_name("second"), "--publish", "18110:7000") == "198.19.0.3"
    node.ok("gc")
    assert sorted(p.name for p in claims_dir.iterdir()) == [
        "address-198.19.0.2", "address-198.19.0.3", "tcp-18110"
    ]  # fmt: skip


def test_kill_goes_as_far_as_it_can_when_iptables_fails(node: Node, tmp_path: Path) -> None:
    published, plain = unique_name("pub"), unique_name("plain")
    node.serve(published, "--publish", "18120:7000")
    node.serve(plain)
    failing = tmp_path / "failing"
    failing.mkdir()
    for program in ("iptables", "iptables-save", "iptables-restore"):
        (failing / program).write_text("#!/bin/sh\necho 'iptables: resource problem' >&2\nexit 4\n")
        (failing / program).chmod(0o755)
    registry = containers.Registry(node.state_dir)
    netns, veth = network.names(registry, published)
    broken = node.kerrickpt("kill", published, PATH=f"{failing}:{os.environ['PATH']}")
    assert broken.returncode == 16, broken.stderr
    assert "its published ports" in broken.stderr
    # The rest went all the same; the container stays listed until its rules go too.
    assert veth not in node.ip("-o", "link", "show")
    assert not (Path("/run/netns") / netns).exists()
    assert published in node.addresses()
    node.ok("kill", published)
    assert "18120" not in node.nat_rules()
    assert published not in node.addresses()

    # A node without iptables has no rules of kerrickpt's: a container that published nothing goes.
    bare = tmp_path / "bare"
    bare.mkdir()
    for program in ("ip", "nsenter"):
        (bare / program).symlink_to(shutil.which(program) or program)
    done = node.kerrickpt("kill", plain, PATH=str(bare))
    assert done.returncode == 0, done.stderr
    assert plain not in node.addresses()


@KINDS
def test_a_restore_that_fails_after_criu_answers_no_packet(
    node: Node, client: Callable[[str], Client], tmp_path: Path, kind: tuple[str, ...]
) -> None:
    name, _, talking = _talking(node, client, *kind)
    node.ok("checkpoint", name, "-o", str(tmp_path / "a.kckpt"))
    # Restored, then failed and killed: cut off all along, it never answered the client, whose connection the
    # archive still holds for the next try.
    failed = node.kerrickpt("restore", str(tmp_path / "a.kckpt"), KERRICKPT_FAULT="restore-after-criu:fail")
    assert failed.returncode == 8, failed.stderr
    assert name not in node.addresses()
    node.ok("restore", str(tmp_path / "a.kckpt"))
    talking.wait_more()
    answers = talking.finish()
    assert answers == list(range(1, len(answers) + 1))


def test_tcp_close_needs_an_archive_with_a_network(node: Node, tmp_path: Path) -> None:
    name = unique_name("hostnet")
    node.ok("run", "--name", name, "--", "sleep", "600")
    node.ok("checkpoint", name, "-o", str(tmp_path / "a.kckpt"))
    refused = node.kerrickpt("restore", str(tmp_path / "a.kckpt"), "--tcp-close")
    assert refused.returncode == 2
    assert "has no network of its own" in refused.stderr


def test_the_node_network_is_chosen_once_and_checked(node: Node) -> None:
    subnet = {"KERRICKPT_SUBNET": "198.19.128.0/24"}
    first = node.ok("run", "--name", unique_name("a"), "--net", "own", "--", "sleep", "600", **subnet)
    assert first["address"] == "198.19.128.2/24"
    # Later commands keep it, whatever their environment says (a migration's agent, gc, cron).
    second = node.ok("run", "--name", unique_name("b"), "--net", "own", "--", "sleep", "600")
    assert second["address"] == "198.19.128.3/24"
    other = node.kerrickpt("run", "--name", unique_name("c"), "--net", "own", "--", "sleep", "600",
                           KERRICKPT_SUBNET="198.19.64.0/24")  # fmt: skip
    assert other.returncode == 2
    assert "this node's network is 198.19.128.0/24 on bridge kerrickpt0" in other.stderr


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"KERRICKPT_BRIDGE": "lo"}, "is a plain interface of this node, not a bridge"),
        ({"KERRICKPT_BRIDGE": "kerrickpt-bridge0"}, "give an interface name of 1 to 15"),
        ({"KERRICKPT_BRIDGE": "kpt-taken"}, "carries 198.19.5.1/24, not only the node network's gateway"),
        ({"KERRICKPT_BRIDGE": "kpt-stp"}, "bridge kpt-stp runs the kernel's spanning tree protocol"),
        ({"KERRICKPT_SUBNET": "198.19.0.0/31"}, "too small for a gateway and a container"),
        ({"KERRICKPT_SEGMENT": "kpt-lan"}, "segment kpt-lan carries this node's own addresses (198.18.7.1/24)"),
    ],
)
def test_a_bridge_or_subnet_the_node_network_cannot_have_is_refused(
    node: Node, env: dict[str, str], reason: str
) -> None:
    if env.get("KERRICKPT_BRIDGE") == "kpt-taken":  # a bridge of another network, on the node network's subnet
        node.ip("link", "add", "kpt-taken", "type", "bridge")
        node.ip("addr", "add", "198.19.5.1/24", "dev", "kpt-taken")
    if env.get("KERRICKPT_BRIDGE") == "kpt-stp":  # every cut-off of a container on it would fail (EBUSY)
        node.ip("link", "add", "kpt-stp", "type", "bridge", "stp_state", "1")
    if env.get("KERRICKPT_SEGMENT") == "kpt-lan":  # the node's own way to its LAN: joined, it would cut the node off
        node.ip("link", "add", "kpt-lan", "type", "veth", "peer", "name", "kpt-lan-peer")
        node.ip("addr", "add", "198.18.7.1/24", "dev", "kpt-lan")
    refused = node.kerrickpt("run", "--name", unique_name("bad"), "--net", "own", "--", "sleep", "600", **env)
    assert refused.returncode == 2, refused.stderr
    assert reason in refused.stderr
    assert not (node.state_dir / "network.json").exists()  # nothing chosen: the next may choose better
    assert "lo" in node.ip("-4", "-o", "addr", "show", "dev", "lo")  # left as it was
    if "KERRICKPT_SEGMENT" in env:
        assert "master" not in node.ip("-o", "link", "show", "dev", "kpt-lan")


def test_two_state_directories_never_share_a_node_network(node: Node, tmp_path: Path) -> None:
    node.serve(unique_name("first"))
    other, second = Node(node.netns, tmp_path / "other-state"), unique_name("second")
    refused = other.kerrickpt("run", "--name", second, "--net", "own", "--", "sleep", "600")
    assert refused.returncode == 2
    assert f"bridge kerrickpt0 is the node network of state directory {node.state_dir.resolve()}" in refused.stderr
    assert not (other.state_dir / "containers" / second).exists()  # nothing of it left
