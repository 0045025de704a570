"""Compatibility verdicts between a source and a target fingerprint."""

from __future__ import annotations

from dataclasses import replace

from kerrickpt import compat, node
from kerrickpt.node import Fingerprint

SOURCE = Fingerprint("x86_64", "6.1.0-18", "debian 12", "4.2.1", ("avx2", "fpu", "sse2"), 4096, "hybrid")


def severities(target: Fingerprint) -> dict[str, str]:
    return {d.field: d.severity for d in compat.compare(SOURCE, target).differences}


def test_same_node_is_compatible() -> None:
    verdict = compat.compare(SOURCE, SOURCE)
    assert verdict.is_acceptable() and verdict.explain() == "compatible"


def test_architecture_and_cpu_are_fatal_even_when_forced() -> None:
    target = replace(SOURCE, arch="aarch64", cpu_flags=("fpu", "sse2"))
    verdict = compat.compare(SOURCE, target)
    assert severities(target) == {"arch": "fatal", "cpu_flags": "fatal"}
    assert not verdict.is_acceptable(force=True)
    assert "avx2" in verdict.explain()


def test_older_kernel_refused_unless_forced() -> None:
    target = replace(SOURCE, kernel="5.10.0")
    verdict = compat.compare(SOURCE, target)
    assert severities(target) == {"kernel": "error"}
    assert not verdict.is_acceptable()
    assert verdict.is_acceptable(force=True)


def test_newer_kernel_and_other_os_are_warnings() -> None:
    target = replace(SOURCE, kernel="6.18.4", os_release="debian 13", cpu_flags=(*SOURCE.cpu_flags, "avx512f"))
    assert severities(target) == {"kernel": "warning", "os_release": "warning"}
    assert compat.compare(SOURCE, target).is_acceptable()


def test_older_criu_is_an_error() -> None:
    assert severities(replace(SOURCE, criu_version="3.17.1")) == {"criu_version": "error"}
    assert severities(replace(SOURCE, criu_version="4.10")) == {}


def test_what_a_target_lacks_for_a_network_of_its_own_depends_on_whose_network_namespace_criu_restores() -> None:
    # CRIU restores a confined container's network namespace and moves kerrickpt's veth into it (newifindex); a
    # plain container's is kerrickpt's, which CRIU restores into (external_net_ns).
    features = {"tcp_repair": True, "external_net_ns": True, "newifindex": False, "port_filter": True}
    assert node.network_lacking(features, confined=False) == []
    (why,) = node.network_lacking(features, confined=True)
    assert "(newifindex)" in why
    assert node.network_lacking(features | {"newifindex": True, "external_net_ns": False}, confined=True) == []


def test_a_target_without_the_port_filter_lacks_it_for_either_kind_of_container() -> None:
    # Without ebtables' nat table the target's restore would fail to make the port filter after the source froze.
    features = {"tcp_repair": True, "external_net_ns": True, "newifindex": True, "port_filter": False}
    for confined in (False, True):
        (why,) = node.network_lacking(features, confined=confined)
        assert "ebtables" in why
