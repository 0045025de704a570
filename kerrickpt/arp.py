"""Owns ARP on the node network (RFC 826, RFC 5227), through raw AF_PACKET sockets: asking a segment which
machines answer for an address (a probe, as duplicate address detection sends it), and announcing that an address
now lives behind this node's port (a gratuitous ARP, sent from inside the container's network namespace).

Raw sockets rather than iputils' arping: a few frames of fixed layout need no program to install, wrap and time
out, and a probe's answers are read as frames, never judged from a program's words."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kerrickpt.errors import HostError

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
REQUEST, REPLY = 1, 2
# Three probes over PROBE_WAIT (RFC 5227 spreads them over seconds, which a pre-flight cannot wait): an answer to
# any of them is a machine that holds the address.
PROBES, PROBE_WAIT = 3, 0.6
CLONE_NEWNET = 0x40000000
# RFC 5227 sends two announcements, two seconds apart; a migration's segment must learn at once, and a repeat soon
# after covers a first one lost.
ANNOUNCEMENTS, ANNOUNCE_GAP = 3, 0.1


@dataclass(frozen=True)
class Answers:
    """Who answered a probe on a segment: each MAC that answered for the address (or claimed it meanwhile), and the
    replies each sent to the `probes` sent."""

    replies: dict[str, int]
    probes: int

    @property
    def macs(self) -> set[str]:
        return set(self.replies)

    def doubled(self) -> set[str]:
        """The MACs that replied more often than they were asked: two machines answer with one MAC (a container
        and a copy of it), which the MACs alone cannot tell apart."""
        return {mac for mac, count in self.replies.items() if count > self.probes}


def probe(ifname: str, address: str) -> Answers:
    """Who answers for `address` on the segment `ifname` reaches (no MAC: none did)."""
    wanted = ipaddress.IPv4Address(address).packed
    replies: dict[str, int] = {}
    sent = 0
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
            sock.bind((ifname, ETH_P_ARP))
            mine = sock.getsockname()[4]
            # A probe says it is from no address (0.0.0.0), so that no neighbour's cache takes it for a claim.
            ask = _frame(mine, REQUEST, bytes(4), wanted)
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < PROBE_WAIT:
                if sent < PROBES and elapsed >= sent * PROBE_WAIT / PROBES:
                    sock.send(ask)
                    sent += 1
                sock.settimeout(max(0.01, min(PROBE_WAIT / PROBES, PROBE_WAIT - elapsed)))
                try:
                    frame = sock.recv(128)
                except TimeoutError:
                    continue
                sender = _sender(frame)
                if sender is not None and sender[1] == wanted and sender[0] != mine:
                    mac = _mac(sender[0])
                    # Only a reply to this node counts as an answer to one of its probes; a request from the holder
                    # (asking for its gateway, or announcing itself) says only that it is there.
                    replies[mac] = replies.get(mac, 0) + int(_is_reply_to(frame, mine))
    except OSError as exc:
        raise HostError(f"asking who holds {address} on {ifname} failed: {exc}") from exc
    return Answers(replies, sent)


def announce(netns: Path, ifname: str, address: str, mac: str) -> None:
    """Send a gratuitous ARP for `address` at `mac` out of `ifname` of the network namespace pinned at `netns`:
    switches learn the port the address lives behind now, neighbours refresh their caches. Returns once the first
    is sent (HostError if it could not be); ANNOUNCEMENTS - 1 more follow, ANNOUNCE_GAP apart, from a thread this
    process waits for at its exit (a frame lost on the way is not the last word), so the caller goes on at once."""
    own = ipaddress.IPv4Address(address).packed
    frame = _frame(bytes.fromhex(mac.replace(":", "")), REQUEST, own, own)
    first_sent = threading.Event()
    failed: list[BaseException] = []

    def send() -> None:
        # In a thread of its own: setns moves only the calling thread into the namespace, and it ends there.
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            finally:
                os.close(fd)
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
                sock.bind((ifname, ETH_P_ARP))
                sock.send(frame)
                first_sent.set()
                for _ in range(ANNOUNCEMENTS - 1):
                    time.sleep(ANNOUNCE_GAP)
                    sock.send(frame)
        except OSError as exc:
            if not first_sent.is_set():  # a repeat that fails is no failure of the announcement
                failed.append(exc)
        finally:
            first_sent.set()

    threading.Thread(target=send, name="kerrickpt-arp").start()
    first_sent.wait()
    if failed:
        raise HostError(f"announcing {address} from {ifname} in {netns} failed: {failed[0]}")


def _frame(source: bytes, op: int, sender_ip: bytes, target_ip: bytes) -> bytes:
    """An ARP frame from `source`, to everyone on the segment."""
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + source + sender_ip + bytes(6) + target_ip
    return BROADCAST + source + struct.pack("!H", ETH_P_ARP) + arp


def _sender(frame: bytes) -> tuple[bytes, bytes] | None:
    """The sender MAC and address of an Ethernet ARP frame for IPv4, request or reply; None for anything else."""
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", ETH_P_ARP):
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if (htype, ptype, hlen, plen) != (1, 0x0800, 6, 4) or op not in (REQUEST, REPLY):
        return None
    return frame[22:28], frame[28:32]


def _is_reply_to(frame: bytes, mac: bytes) -> bool:
    """Whether the ARP frame `frame` (see _sender) is a reply addressed to `mac`."""
    return struct.unpack("!H", frame[20:22])[0] == REPLY and frame[32:38] == mac


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
