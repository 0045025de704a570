"""ARP frames as kerrickpt sends and reads them, against the bytes RFC 826 lays out (no root needed; the frames'
effect is tested in test_network_migrate)."""

from __future__ import annotations

import ipaddress

from kerrickpt import arp

MAC = bytes.fromhex("0a58c6130502")
ADDRESS = ipaddress.IPv4Address("198.19.5.2").packed
# Ethernet: to everyone, from MAC, ARP. ARP: Ethernet (1), IPv4 (0800), 6- and 4-byte addresses, a request (1).
HEADER = "ffffffffffff0a58c613050208060001080006040001"


def test_an_announcement_says_the_address_is_at_the_mac_to_everyone() -> None:
    frame = arp._frame(MAC, arp.REQUEST, ADDRESS, ADDRESS)
    # Sender MAC and address, target MAC (unknown: zeros) and address: its own.
    assert frame.hex() == HEADER + "0a58c6130502c6130502000000000000c6130502"
    assert arp._sender(frame) == (MAC, ADDRESS)


def test_a_probe_is_from_no_address_and_what_is_not_arp_is_passed_over() -> None:
    probe = arp._frame(MAC, arp.REQUEST, bytes(4), ADDRESS)
    assert probe.hex() == HEADER + "0a58c613050200000000000000000000c6130502"
    assert arp._sender(probe) == (MAC, bytes(4))
    assert arp._sender(probe[:41]) is None  # cut short
    assert arp._sender(probe[:12] + b"\x08\x00" + probe[14:]) is None  # IPv4, not ARP


def test_only_a_reply_to_this_node_answers_its_probe() -> None:
    holder, mine = bytes.fromhex("0a58c6130509"), bytes.fromhex("02aabbccddee")
    # A reply from the holder to `mine`, as Linux answers a probe: its MAC and address, then ours and 0.0.0.0.
    reply = bytes.fromhex("02aabbccddee" "0a58c6130509" "0806" "0001" "0800" "06" "04" "0002"
                          "0a58c6130509" "c6130502" "02aabbccddee" "00000000")  # fmt: skip
    assert arp._sender(reply) == (holder, ADDRESS)
    assert arp._is_reply_to(reply, mine)
    assert not arp._is_reply_to(reply, MAC)  # another's probe
    assert not arp._is_reply_to(arp._frame(holder, arp.REQUEST, ADDRESS, ADDRESS), mine)  # it announces itself


def test_more_replies_than_probes_from_one_mac_are_two_holders() -> None:
    answers = arp.Answers({"0a:58:c6:13:05:02": 4, "0a:58:c6:13:05:09": 3, "02:aa:bb:cc:dd:ee": 0}, probes=3)
    assert answers.macs == {"0a:58:c6:13:05:02", "0a:58:c6:13:05:09", "02:aa:bb:cc:dd:ee"}
    assert answers.doubled() == {"0a:58:c6:13:05:02"}
