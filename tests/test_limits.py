"""Time limits an operator sets in the environment, and how kerrickpt stops a program that overruns them."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kerrickpt import command, limits
from kerrickpt.errors import CommandTimeout, UsageError

# Says it is up, then waits; with "ignore" it does not end on SIGTERM.
SLEEPER = "import signal, sys, time\n{}\nprint('up', flush=True)\ntime.sleep(60)\n"


def test_a_limit_is_its_default_unless_the_environment_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KERRICKPT_SEND_STALL", raising=False)
    assert limits.SEND_STALL.seconds() == 60.0
    monkeypatch.setenv("KERRICKPT_SEND_STALL", "2.5")
    assert limits.SEND_STALL.seconds() == 2.5


@pytest.mark.parametrize("bad", ["soon", "0", "-1", "inf", "nan"])
def test_a_limit_that_is_not_a_positive_number_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("KERRICKPT_DUMP_TIMEOUT", bad)
    with pytest.raises(UsageError, match="KERRICKPT_DUMP_TIMEOUT"):
        limits.DUMP.seconds()


def _started(handler: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", SLEEPER.format(handler)], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"up\n"
    return process


def test_a_program_stopped_gets_sigterm_and_its_grace_before_sigkill(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERRICKPT_STOP_GRACE", "0.5")
    polite = _started("")
    deaf = _started("signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    try:
        assert command.stop(polite) == -signal.SIGTERM
        assert command.stop(deaf) == -signal.SIGKILL
    finally:
        for process in (polite, deaf):
            process.kill()
            process.wait()


def test_a_program_that_overruns_its_time_is_stopped_and_says_what_it_wrote(tmp_path: Path) -> None:
    script = "import sys, time\nprint('half way', file=sys.stderr, flush=True)\ntime.sleep(60)\n"
    with pytest.raises(CommandTimeout, match="was stopped") as failure:
        command.run([sys.executable, "-c", script], timeout=1)
    assert failure.value.log_tail == "half way"
