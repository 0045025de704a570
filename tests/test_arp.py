"""ARP frames as kerrickpt sends and reads them (no root needed; the frames' effect is tested in
test_network_migrate)."""

from __future__ import annotations

import ipaddress

from kerrickpt import arp

MAC = bytes.fromhex("0a58c6130502")
ADDRESS = ipaddress.IPv4Address("198.19.5.2").packed


def test_an_announcement_says_the_address_is_at_the_mac_to_everyone() -> None:
    frame = arp._frame(MAC, arp.REQUEST, ADDRESS, ADDRESS)
    assert frame[:6] == arp.BROADCAST and frame[6:12] == MAC
    assert arp._sender(frame) == (MAC, ADDRESS)


def test_a_probe_is_from_no_address_and_what_is_not_arp_is_passed_over() -> None:
    probe = arp._frame(MAC, arp.REQUEST, bytes(4), ADDRESS)
    assert arp._sender(probe) == (MAC, bytes(4))
    assert arp._sender(probe[:41]) is None  # cut short
    assert arp._sender(probe[:12] + b"\x08\x00" + probe[14:]) is None  # IPv4, not ARP
