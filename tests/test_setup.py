"""`ci/setup --install` puts this checkout's kerrickpt on the PATH; without it, kerrickpt stays in the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SETUP = Path(__file__).parent.parent / "ci" / "setup"

pytestmark = pytest.mark.root


def setup(*args: str, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SETUP), *args],
        env={**os.environ, "KERRICKPT_BIN_DIR": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_install_puts_this_checkouts_kerrickpt_in_the_bin_dir_and_a_second_run_changes_nothing() -> None:
    with tempfile.TemporaryDirectory() as directory:
        bin_dir = Path(directory)
        for _ in range(2):
            result = setup("--install", bin_dir=bin_dir)
            assert result.returncode == 0, result.stderr
        installed = bin_dir / "kerrickpt"
        assert installed.resolve() == Path(sys.executable).with_name("kerrickpt").resolve()
        assert [p.name for p in bin_dir.iterdir()] == ["kerrickpt"], "no temporary link left behind"
        run = subprocess.run(
            ["env", f"PATH={bin_dir}:/usr/bin:/bin", "kerrickpt", "--help"], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0 and run.stdout.startswith("usage: kerrickpt"), run.stderr


def test_without_install_nothing_is_put_in_the_bin_dir_and_an_unknown_option_is_refused() -> None:
    with tempfile.TemporaryDirectory() as directory:
        bin_dir = Path(directory)
        assert setup(bin_dir=bin_dir).returncode == 0
        refused = setup("--instal", bin_dir=bin_dir)
        assert refused.returncode != 0 and "unknown option --instal" in refused.stderr
        assert list(bin_dir.iterdir()) == []
