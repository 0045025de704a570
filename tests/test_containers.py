"""The state directory: names, records, and what a run that died half-way leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from kerrickpt import containers
from kerrickpt.errors import ContainerExistsError, UsageError
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
