"""The node network's settings: chosen from the environment once, stored, and read back (no root needed)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from kerrickpt import netsettings
from kerrickpt.errors import StateDamagedError, UsageError


@dataclass
class Registry:
    root: Path

    def is_gone(self, holder: object) -> bool:
        return True

    def is_arriving(self, migration: str) -> bool:
        return False


def test_a_node_alone_has_the_subnet_its_first_address_and_no_segment(tmp_path: Path) -> None:
    settings = netsettings.load(Registry(tmp_path))
    assert settings.gateway == ipaddress.IPv4Interface("198.19.0.1/16")
    assert settings.pool == settings.subnet == ipaddress.IPv4Network("198.19.0.0/16")
    assert settings.segment is None


def test_a_node_on_a_segment_keeps_its_gateway_pool_and_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = {"KERRICKPT_SUBNET": "198.19.5.0/24", "KERRICKPT_GATEWAY": "198.19.5.2",
              "KERRICKPT_POOL": "198.19.5.80/28", "KERRICKPT_SEGMENT": "lan0"}  # fmt: skip
    for key, value in chosen.items():
        monkeypatch.setenv(key, value)
    registry = Registry(tmp_path)
    netsettings.keep(registry, netsettings.load(registry))
    for key in chosen:
        monkeypatch.delenv(key)
    stored = netsettings.load(registry)  # whatever the environment says now
    assert stored.gateway == ipaddress.IPv4Interface("198.19.5.2/24")
    assert stored.pool == ipaddress.IPv4Network("198.19.5.80/28")
    assert stored.segment == "lan0"
    monkeypatch.setenv("KERRICKPT_GATEWAY", "198.19.5.3")
    with pytest.raises(
        UsageError,
        match=r"198.19.5.0/24 on bridge kerrickpt0 at 198.19.5.2, handing out 198.19.5.80/28, joined to segment lan0",
    ):
        netsettings.load(registry)


def test_a_file_from_before_segments_reads_with_the_defaults(tmp_path: Path) -> None:
    (tmp_path / netsettings.FILE).write_text(json.dumps({"bridge": "kerrickpt0", "subnet": "198.19.128.0/24"}))
    settings = netsettings.load(Registry(tmp_path))
    assert settings.gateway == ipaddress.IPv4Interface("198.19.128.1/24")
    assert settings.pool == settings.subnet
    assert settings.segment is None


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"KERRICKPT_POOL": "198.18.0.0/24"}, "not a part of the node network 198.19.0.0/16"),
        ({"KERRICKPT_GATEWAY": "198.18.0.1"}, "not an address of the node network"),
        ({"KERRICKPT_GATEWAY": "198.19.0.0"}, "not an address of the node network"),
        ({"KERRICKPT_GATEWAY": "gw"}, "not an IPv4 address"),
        ({"KERRICKPT_SEGMENT": "kerrickpt0"}, "cannot be the bridge itself"),
        ({"KERRICKPT_SEGMENT": "-lan"}, "give an interface name"),
    ],
)
def test_settings_a_node_network_cannot_have_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], reason: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match=reason):
        netsettings.load(Registry(tmp_path))


@pytest.mark.parametrize(
    ("stored", "reason"),
    [
        ({"gateway": 3323133953}, "gateway: not a string"),  # a number ipaddress would take for 198.19.0.1
        ({"pool": "198.18.0.0/24"}, "pool=198.18.0.0/24: not a part of the node network"),  # the file's key, not $
    ],
)
def test_a_damaged_file_is_refused_naming_its_keys(tmp_path: Path, stored: dict[str, object], reason: str) -> None:
    (tmp_path / netsettings.FILE).write_text(json.dumps({"bridge": "kerrickpt0", "subnet": "198.19.0.0/16", **stored}))
    with pytest.raises(StateDamagedError, match=reason):
        netsettings.load(Registry(tmp_path))
