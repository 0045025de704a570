"""The test hooks act only in test mode, which an operator's environment does not enter by accident."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import kerrickpt
from kerrickpt import faults, node, testmode
from kerrickpt.transport import Link, Target
from tests.helpers import KERRICKPT, cli_env, unique_name


def outside_test_mode(state_dir: Path, **hooks: str) -> dict[str, str]:
    env = {k: v for k, v in cli_env(state_dir, **hooks).items() if k != testmode.ENV}
    assert faults.ENV in env or node.TEST_FINGERPRINT_ENV in env
    return env


def test_the_test_run_is_in_test_mode_and_its_hooks_act(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "somewhere:fail")
    assert testmode.active()
    with pytest.raises(faults.InjectedFault):
        faults.inject("somewhere")


def test_hooks_do_nothing_without_test_mode(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(testmode.ENV)
    monkeypatch.setenv(faults.ENV, "somewhere:fail")
    monkeypatch.setenv(node.TEST_FINGERPRINT_ENV, "arch=aarch64")

    faults.inject("somewhere")

    assert not faults.is_set("somewhere")
    assert node.fingerprint("4.2.1").arch != "aarch64"
    assert "ignoring $KERRICKPT_FAULT" in capsys.readouterr().err


def marker(tmp_path: Path, text: str = testmode.MARKER, mode: int = 0o644) -> Path:
    path = tmp_path / "marker"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d: marker(d, mode=0o664), id="group-writable"),
        pytest.param(lambda d: marker(d, mode=0o646), id="others-writable"),
        pytest.param(lambda d: marker(d, text="1\n"), id="other-content"),
        pytest.param(lambda d: marker(d, text=testmode.MARKER + "x"), id="more-content"),
        pytest.param(lambda d: d, id="a-directory"),
        pytest.param(lambda d: d / "missing", id="missing"),
        pytest.param(lambda d: (d / "link").symlink_to(marker(d)) or d / "link", id="a-symlink"),
        pytest.param(lambda d: Path(os.path.relpath(marker(d))), id="relative"),
    ],
)
def test_what_does_not_enter_test_mode(make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(testmode.ENV, str(make(tmp_path)))
    monkeypatch.setenv(faults.ENV, "somewhere:fail")

    assert not testmode.active()
    faults.inject("somewhere")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to own a file that is not root's")
def test_a_marker_owned_by_another_user_does_not_enter_test_mode(tmp_path: Path, monkeypatch) -> None:
    path = marker(tmp_path)
    os.chown(path, 65534, 65534)
    monkeypatch.setenv(testmode.ENV, str(path))
    assert not testmode.active()


def test_hooks_are_forwarded_over_ssh_only_in_test_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    link = Link(Target("node7", "root"))
    assert "SendEnv=KERRICKPT_TEST_MODE KERRICKPT_FAULT KERRICKPT_TEST_FINGERPRINT" in link.argv(["ps"])

    monkeypatch.delenv(testmode.ENV)
    monkeypatch.setenv(faults.ENV, "target-after-restore:kill")

    assert not [a for a in link.argv(["ps"]) if a.startswith("SendEnv")]


@pytest.mark.root
def test_an_operators_environment_cannot_fail_a_restore_or_fake_the_node(
    start_workload, state_dir: Path, tmp_path: Path
) -> None:
    w = start_workload()
    archive = tmp_path / "w.kckpt"
    kerrickpt.checkpoint(w.name, archive, leave_running=True, state_dir=state_dir)

    check = subprocess.run(
        [*KERRICKPT, "check", "--against", str(archive), "--json"],
        env=outside_test_mode(state_dir, KERRICKPT_TEST_FINGERPRINT="arch=aarch64"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["compatible"]
    assert "ignoring $KERRICKPT_TEST_FINGERPRINT" in check.stderr

    copy = unique_name("copy")
    restore = subprocess.run(
        [*KERRICKPT, "restore", str(archive), "--name", copy],
        env=outside_test_mode(state_dir, KERRICKPT_FAULT="restore-before-criu:exit"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert restore.returncode == 0, restore.stderr
    assert [r.state for r in kerrickpt.ps(state_dir) if r.name == copy] == ["running"]
