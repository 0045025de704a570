"""The state directory: names, records, and what a run that died half-way leaves behind."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import pytest

from kerrickpt import containers, network
from kerrickpt.errors import ContainerExistsError, HostError, Interrupted, RestoreFailed, UsageError
from tests.helpers import unique_name

pytestmark = pytest.mark.root


def test_names_are_checked_and_claimed_once(state_dir: Path) -> None:
    registry = containers.Registry(state_dir)
    for bad in ("", "../x", "a/b", "-x", "x" * 64):
        with pytest.raises(UsageError):
            registry.reserve(bad)
    name = unique_name()
    registry.reserve(name)
    with pytest.raises(ContainerExistsError):
        registry.reserve(name)
    assert (state_dir / "containers").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("signalled", [False, True], ids=["error", "signal"])
def test_a_failure_whose_network_does_not_go_says_so_and_keeps_the_name(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, signalled: bool
) -> None:
    registry = containers.Registry(state_dir)
    name = unique_name()
    registry.reserve(name)

    def stuck(_: object) -> None:
        raise HostError("veth kpt-x could not be removed: Device or resource busy")

    monkeypatch.setattr(network, "cut_off", stuck)
    monkeypatch.setattr(network, "destroy", stuck)
    failure: BaseException = Interrupted(15) if signalled else RestoreFailed("criu restore failed")

    with caplog.at_level(logging.WARNING, logger="kerrickpt.containers"):
        containers.undo(registry, name, None, cast(network.Network, object()), failure)

    said = caplog.text if signalled else cast(RestoreFailed, failure).message
    assert "veth kpt-x could not be removed" in said and "`kerrickpt gc`" in said
    assert registry.path(name).is_dir(), "the name stays reserved until gc removes the rest"
