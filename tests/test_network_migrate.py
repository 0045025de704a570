"""Migration of containers with a network of their own between local nodes that share a segment (see localnodes):
a client on the segment keeps its connection, every answer checked, post-copy too; a target off the segment is refused
before the freeze and `--net-remap` moves the container there with a new address; a migration that fails resumes the
source with its connections; an address another machine of the segment holds is refused before the freeze, and the
source never hands out the address of a container that migrated away. Confined containers (their own root and users,
the server running as a user) move with their connections too, post-copy where the node grants a userfaultfd inside a
user namespace (refused before the freeze where it does not)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.lab import redis_server
from kerrickpt import containers, netlinks, netports, netsettings, network
from kerrickpt.localnodes import SEGMENT, Cluster, Node, kerrickpt_path
from tests.helpers import CONFINED, CONFINED_USER, Client, finished, uid_inside, unique_name, wait_for

pytestmark = pytest.mark.root

PORT = 7000
Talk = Callable[[list[str], str], Client]
# Each test of a connection's move runs for a plain container and for a confined one, whose server runs as a user.
KINDS = pytest.mark.parametrize("kind", [(), CONFINED], ids=["plain", "confined"])


@pytest.fixture
def talk(tmp_path: Path) -> Iterator[Talk]:
    """Start a redis client with `talk(enter, address)`; each is ended afterwards whatever happened."""
    started: list[Client] = []

    def start(enter: list[str], address: str) -> Client:
        started.append(Client.start(enter, address, PORT, tmp_path))
        return started[-1]

    yield start
    for client in started:
        client.end()


def _serve(node: Node, name: str, *options: str) -> str:
    """Start redis-server as container `name` on `node`, with a network of its own (and `options` of `run`); its
    ADDR/PREFIX."""
    started = node.kerrickpt("run", "--json", "--name", name, "--net", "own", *options, "--", *redis_server(PORT))
    assert started.returncode == 0, started.stderr
    return str(json.loads(started.stdout)["address"])


def _in(netns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"]


def _migrate(
    cluster: Cluster, source: Node, target: Node, name: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return source.kerrickpt("migrate", name, *cluster.migrate_args(target), *extra, "--json", env=env)


def _rows(node: Node) -> dict[str, dict[str, object]]:
    return {row["name"]: row for row in node.json("ps")}


def _talking(cluster: Cluster, node: Node, talk: Talk, *options: str) -> tuple[str, str, Client]:
    """A redis started on `node` (see _serve, with `options`) and a client on the LAN answered by it: its name,
    address and client."""
    name = unique_name("net")
    address = _serve(node, name, *options)
    client = talk(_in(cluster.switch), address.split("/")[0])
    client.wait_more()
    return name, address, client


def _stayed(source: Node, target: Node, name: str) -> None:
    """Nothing moved: `name` runs on `source`, and `target` has nothing of it."""
    assert _rows(source)[name]["state"] == "running"
    assert name not in _rows(target)


def _serves_as(node: Node, name: str) -> int:
    """The uid container `name`'s server on `node` runs as, inside."""
    return uid_inside(int(str(_rows(node)[name]["init_pid"])))


def _in_sequence(client: Client) -> None:
    """Once `client` has more answers, stop it: each answer came in turn, none lost or twice (the client checked
    each)."""
    client.wait_more()
    answers = client.finish()
    assert answers == list(range(1, len(answers) + 1))


@KINDS
def test_a_connection_survives_a_migration_between_nodes_sharing_a_segment(
    cluster: Cluster, talk: Talk, kind: tuple[str, ...]
) -> None:
    a, b = cluster.nodes
    # The LAN's switch drops IPv6 frames, which a container sends as its link comes up: so it learns the
    # container's new place from the announcement alone (else from them, about a second later).
    drop = ["ebtables", "-t", "nat", "-A", "PREROUTING", "-p", "IPv6", "-j", "DROP"]
    subprocess.run([*_in(cluster.switch), *drop], check=True, timeout=30)
    name, address, client = _talking(cluster, a, talk, *kind)

    moved = _migrate(cluster, a, b, name)

    assert moved.returncode == 0, moved.stderr
    answer = json.loads(moved.stdout)
    assert answer["address"] == address
    assert _serves_as(b, name) == (CONFINED_USER if kind else 0)
    # Cut off on a once frozen, connected on b before b answered: the network lock lies within the downtime.
    assert 0 < answer["timings"]["network_lock_s"] < answer["downtime_s"]
    # Announced from b before the migration ended: the LAN's switch sends the container's frames to b's port.
    fdb = json.loads(subprocess.check_output(["bridge", "-n", cluster.switch, "-j", "fdb", "show", "br", SEGMENT]))
    mac = network.mac_of(ipaddress.IPv4Interface(address).ip)
    assert [row["ifname"] for row in fdb if row["mac"] == mac] == [f"l{cluster.id}b"]
    _in_sequence(client)
    assert _rows(b)[name]["address"] == address
    assert name not in _rows(a)


@KINDS
def test_a_connection_survives_a_post_copy_migration(
    cluster: Cluster, talk: Talk, kind: tuple[str, ...], big_pipes: None, userfaultfd_in_user_namespaces: None
) -> None:
    a, b = cluster.nodes
    name, address, client = _talking(cluster, a, talk, *kind)

    moved = _migrate(cluster, a, b, name, "--lazy")

    assert moved.returncode == 0, moved.stderr
    answer = json.loads(moved.stdout)
    assert answer["lazy"] is True and answer["address"] == address
    _in_sequence(client)  # answered from b, its memory coming as it is touched
    assert _rows(b)[name]["address"] == address
    assert _serves_as(b, name) == (CONFINED_USER if kind else 0)
    assert name not in _rows(a)


def test_a_post_copy_migration_of_a_confined_container_without_userfaultfd_in_user_namespaces_is_refused(
    cluster: Cluster, talk: Talk, big_pipes: None, no_userfaultfd_in_user_namespaces: None
) -> None:
    a, b = cluster.nodes
    name, _, client = _talking(cluster, a, talk, *CONFINED)

    refused = _migrate(cluster, a, b, name, "--lazy")

    assert refused.returncode == 3, refused.stderr
    assert "vm.unprivileged_userfaultfd=1" in refused.stderr and "Nothing was frozen" in refused.stderr
    _in_sequence(client)  # never cut off
    _stayed(a, b, name)


def test_the_source_never_hands_out_the_address_of_a_container_that_migrated_away(cluster: Cluster) -> None:
    a, b = cluster.nodes
    name = unique_name("net")
    address = _serve(a, name)  # the first free address of a's pool
    assert _migrate(cluster, a, b, name).returncode == 0

    # a's claim went with the container, but the segment still answers for the address: from b.
    other = _serve(a, unique_name("net"))
    ip = address.split("/")[0]
    refused = a.kerrickpt("run", "--name", unique_name("net"), "--net", "own", "--ip", address, "--", "true")

    assert other != address
    assert refused.returncode == 2, refused.stderr
    assert (
        f"address {ip} is in use on this node's segment {SEGMENT}, by {network.mac_of(ipaddress.IPv4Address(ip))}"
        in (refused.stderr)
    )


@KINDS
def test_a_migration_that_fails_on_the_target_resumes_the_source_with_its_connection(
    cluster: Cluster, talk: Talk, kind: tuple[str, ...]
) -> None:
    a, b = cluster.nodes
    name, _, client = _talking(cluster, a, talk, *kind)

    # Restored on b, then failed: b never connected it, and a takes its connection back.
    failed = a.kerrickpt("migrate", name, *cluster.migrate_args(b), env={"KERRICKPT_FAULT": "restore-after-criu:fail"})

    assert failed.returncode == 8, failed.stderr
    assert "runs on here again" in failed.stderr
    _in_sequence(client)
    _stayed(a, b, name)


@pytest.mark.parametrize(
    ("fault", "code", "said"),
    [
        # b makes the container's network before the archive comes, then the link drops mid-way, twice: each
        # receiver removes what it made; the source resumes.
        ("transfer-cut", 11, "runs on here again"),
        # b fails once it made the network: it removes it, and the source hears so before the freeze.
        ("prepare-after-network:fail", 1, "fault injected at prepare-after-network"),
    ],
)
@KINDS
def test_a_migration_that_fails_before_the_restore_leaves_nothing_of_the_network_on_the_target(
    cluster: Cluster, talk: Talk, kind: tuple[str, ...], fault: str, code: int, said: str
) -> None:
    a, b = cluster.nodes
    name, _, client = _talking(cluster, a, talk, *kind)

    failed = _migrate(cluster, a, b, name, "--attempts", "2", env={"KERRICKPT_FAULT": fault})

    assert failed.returncode == code, failed.stderr
    assert said in failed.stderr
    _in_sequence(client)
    _stayed(a, b, name)
    _nothing_made_on(b, name)
    assert not _claims_on(b, name), "its claims went"


def test_an_address_another_machine_of_the_segment_holds_is_refused_before_the_freeze(cluster: Cluster) -> None:
    a, b = cluster.nodes
    name = unique_name("net")
    address = _serve(a, name)
    ip = address.split("/")[0]
    # A machine of the LAN (the switch) answers for the container's address too, with a MAC of its own.
    subprocess.run(["ip", "-n", cluster.switch, "addr", "add", f"{ip}/32", "dev", SEGMENT], check=True, timeout=30)
    squatter = json.loads(subprocess.check_output(["ip", "-n", cluster.switch, "-j", "link", "show", SEGMENT]))

    refused = _migrate(cluster, a, b, name)

    assert refused.returncode == 2, refused.stderr
    assert f"address {ip} is in use on this node's segment {SEGMENT}, by {squatter[0]['address']}" in refused.stderr
    assert "nothing was frozen" in refused.stderr
    _stayed(a, b, name)


@KINDS
def test_a_target_off_the_segment_is_refused_and_net_remap_moves_the_container_to_a_new_address(
    cluster: Cluster, talk: Talk, kind: tuple[str, ...]
) -> None:
    a, b = cluster.nodes
    # b's node network is joined to an interface that reaches no other node, not to the LAN.
    subprocess.run(["ip", "-n", b.netns, "link", "add", "lanx", "type", "veth", "peer", "name", "lany"], check=True,
                   timeout=30)  # fmt: skip
    b.stop_sshd()
    b.extra_env[netsettings.SEGMENT_ENV] = "lanx"
    b.start_sshd()
    cluster.wait_for_sshd(b)
    name, address, client = _talking(cluster, a, talk, *kind)

    refused = _migrate(cluster, a, b, name)

    assert refused.returncode == 14, refused.stderr
    assert "does not answer at" in refused.stderr and "--net-remap" in refused.stderr
    client.wait_more()  # nothing was frozen

    moved = _migrate(cluster, a, b, name, "--net-remap")

    assert moved.returncode == 0, moved.stderr
    remapped = json.loads(moved.stdout)["address"]
    assert remapped != address
    pool = ipaddress.IPv4Network(b.extra_env[netsettings.POOL_ENV])
    assert ipaddress.IPv4Interface(remapped).ip in pool
    # Its listener came along: a new connection (from b, the only way to it now) is answered.
    again = talk(_in(b.netns), remapped.split("/")[0])
    _in_sequence(again)
    assert _rows(b)[name]["address"] == remapped


def test_net_remap_of_a_container_listening_on_its_own_address_is_refused_before_the_freeze(cluster: Cluster) -> None:
    a, b = cluster.nodes
    name = unique_name("net")
    ip = str(list(ipaddress.IPv4Network(a.extra_env[netsettings.POOL_ENV]))[-2])
    listen = "import socket,sys,time; s=socket.socket(); s.bind((sys.argv[1], 7001)); s.listen(); time.sleep(600)"
    started = a.kerrickpt("run", "--json", "--name", name, "--net", "own", "--ip", ip, "--", sys.executable, "-c",
                          listen, ip)  # fmt: skip
    assert started.returncode == 0, started.stderr
    init_pid = int(json.loads(started.stdout)["init_pid"])
    wait_for(lambda: netports.listening(init_pid), what="its listener")

    refused = _migrate(cluster, a, b, name, "--net-remap")

    assert refused.returncode == 2, refused.stderr
    assert f"listens on its own address ({ip}:7001)" in refused.stderr and "Nothing was frozen" in refused.stderr
    _stayed(a, b, name)


@KINDS
def test_a_container_whose_receiver_died_before_connecting_it_is_connected_by_recover(
    cluster: Cluster, talk: Talk, kind: tuple[str, ...]
) -> None:
    a, b = cluster.nodes
    name, _, client = _talking(cluster, a, talk, *kind)

    # b's receiver dies with the container restored and recorded, still cut off: `recover` asks what became of it.
    moved = a.kerrickpt("migrate", name, *cluster.migrate_args(b), env={"KERRICKPT_FAULT": "restore-after-save:kill"})
    assert moved.returncode == 12, moved.stderr
    recovered = a.kerrickpt("recover", name)

    assert recovered.returncode == 0, recovered.stderr
    _in_sequence(client)
    assert _rows(b)[name]["state"] == "running"
    assert name not in _rows(a)


def test_a_node_port_another_container_of_the_target_publishes_is_refused_before_the_freeze(cluster: Cluster) -> None:
    a, b = cluster.nodes
    holder, name = unique_name("net"), unique_name("net")
    held = b.kerrickpt("run", "--name", holder, "--net", "own", "--publish", "18091:7000", "--", "sleep", "600")
    assert held.returncode == 0, held.stderr
    started = a.kerrickpt("run", "--name", name, "--net", "own", "--publish", "18091:7000", "--", "sleep", "600")
    assert started.returncode == 0, started.stderr

    refused = _migrate(cluster, a, b, name)

    assert refused.returncode == 2, refused.stderr
    assert f"container {holder} publishes node port 18091/tcp" in refused.stderr
    assert "nothing was frozen" in refused.stderr
    _stayed(a, b, name)


@KINDS
def test_a_receiver_ended_by_sigterm_mid_transfer_leaves_nothing_of_the_network_on_the_target(
    cluster: Cluster, talk: Talk, kind: tuple[str, ...]
) -> None:
    a, b = cluster.nodes
    name, _, client = _talking(cluster, a, talk, *kind)

    def ended(marker: Path) -> None:
        wait_for(lambda: not marker.exists(), timeout=30, what="the receiver to end")
        _nothing_made_on(b, name)  # while the source is stopped: the receiver removed it, not `gc` nor the source

    err = _receiver_signalled_mid_transfer(cluster, name, signal.SIGTERM, ended)

    assert b"runs on here again" in err
    assert b"ended by SIGTERM before" in err, "the receiver said it restored nothing: the source need not wait frozen"
    _in_sequence(client)
    _stayed(a, b, name)
    assert not _claims_on(b, name), "its claims went with the pre-flight"


def test_what_a_receiver_killed_mid_transfer_left_does_not_stop_the_next_migration(
    cluster: Cluster, talk: Talk
) -> None:
    a, b = cluster.nodes
    name, address, client = _talking(cluster, a, talk)
    _receiver_signalled_mid_transfer(cluster, name, signal.SIGKILL, lambda _: None)
    assert _rows(a)[name]["state"] == "running"
    assert _rows(b)[name]["state"] == "abandoned", "the killed receiver left the name, with its network"

    moved = _migrate(cluster, a, b, name)  # its pre-flight removes what the killed receiver left under the name

    assert moved.returncode == 0, moved.stderr
    _in_sequence(client)
    assert _rows(b)[name]["address"] == address


def _receiver_signalled_mid_transfer(
    cluster: Cluster, name: str, signum: signal.Signals, meanwhile: Callable[[Path], None]
) -> bytes:
    """Migrate `name` from a to b, once, sending b's receiver `signum` while the source is stopped with its archive
    sent up to the manifest (b made the container's network and waits), then `meanwhile(its marker)`: the source's
    stderr, once it failed (exit 11)."""
    a, b = cluster.nodes
    argv = ["nsenter", f"--net=/run/netns/{a.netns}", kerrickpt_path(), "migrate", name, "--attempts", "1"]
    env = {**os.environ, **a.env(), "KERRICKPT_FAULT": "archive-before-manifest:pause"}
    run = subprocess.Popen([*argv, *cluster.migrate_args(b)], stderr=subprocess.PIPE, env=env)
    try:
        _, status = os.waitpid(run.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the source stops mid-transfer"
        (marker,) = (b.state_dir / "incoming").glob("*.json")
        _, veth = network.names(containers.Registry(b.state_dir), name)
        assert _shows(b, "ip", "link", "show", veth), "b made the network before the archive came"
        os.kill(int(json.loads(marker.read_text())["pid"]), signum)
        meanwhile(marker)
    finally:
        os.kill(run.pid, signal.SIGCONT)
        _, err = finished(run, 120)
    assert run.returncode == 11, err
    return err


def _nothing_made_on(node: Node, name: str) -> None:
    """`node` has nothing of container `name`: its name, its network namespace, its veth (or the end a confined
    one's restore would have moved in) and its chains of packet rules are gone."""
    netns, veth = network.names(containers.Registry(node.state_dir), name)
    assert not (netlinks.NETNS_DIR / netns).exists()
    made = network.Network("", "", netns=netns, veth=veth)
    for look in (
        ["ip", "link", "show", veth],
        ["ip", "link", "show", made.unplaced],
        ["iptables", "-w", "-t", "nat", "-S", made.chain],
        ["ebtables", "-t", "nat", "-L", made.chain],
    ):
        assert not _shows(node, *look), f"{look[-1]} went"
    assert not (node.state_dir / "containers" / name).exists()


def _claims_on(node: Node, name: str) -> list[Path]:
    """The address and node port claims on `node` that name container `name`."""
    return [p for p in (node.state_dir / network.DIRECTORY).iterdir() if name in p.read_text()]


def _shows(node: Node, *look: str) -> bool:
    """Whether `look` (ip, iptables or ebtables showing a link or a chain) finds it in `node`'s network namespace."""
    shown = subprocess.run(["ip", "netns", "exec", node.netns, *look], capture_output=True, check=False, timeout=30)
    return shown.returncode == 0
