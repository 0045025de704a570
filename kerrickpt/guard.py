"""Owns the guardian: a separate process that thaws a frozen container if kerrickpt dies mid-checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kerrickpt.freezer import Freezer

DISARM = b"d"


class Guardian:
    """Starts standing by at once; should this process die or fail in the block, the cgroup is thawed.

    The guardian waits on a pipe whose write end this process and, by inheritance, CRIU hold.
    Leaving the block normally disarms it. A death or an exception closes the pipe, and
    once CRIU (which finishes its dump and leaves the cgroup frozen) is gone too, the
    guardian thaws the cgroup. Like Popen, it starts in the constructor.
    """

    def __init__(
        self,
        freezer: Freezer,
        archive: tuple[Path, Path] | None = None,
        reconnect: tuple[list[str], float] | None = None,
    ) -> None:
        """`archive` is (the partial file, where it is linked when complete): once it is there,
        the container's state is in the archive, and a death leaves it frozen for `recover`. `reconnect`, the command
        that connects a container a checkpoint cut off its network again, with its timeout (see
        netlinks.connecting), is run before the thaw."""
        reader, writer = os.pipe()
        try:
            # Inherits the caller's inheritable fds on purpose: a lock the caller holds (the
            # snapshot store's) stays held until the guardian has thawed the container.
            # It starts while CRIU dumps, on the cores CRIU needs: so it runs this file as a
            # script of the standard library alone (-I: not from its directory, -S: no
            # site), not through the package, whose imports took 70 ms of CPU.
            control, thawed = freezer.control(frozen=False)
            written = [str(p) for p in archive] if archive else []
            connecting = json.dumps({"argv": reconnect[0], "timeout": reconnect[1]}) if reconnect else ""
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__, str(control), thawed, connecting, *written],
                stdin=reader,
                stdout=subprocess.DEVNULL,
                close_fds=False,
                start_new_session=True,
            )
        except BaseException:
            os.close(writer)
            raise
        finally:
            os.close(reader)
        # Only now, so that the guardian itself does not hold it: CRIU's swrk inherits it.
        os.set_inheritable(writer, True)
        self.writer = writer

    def __enter__(self) -> Guardian:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        # A failure that says the processes must stay frozen (errors.ContainerDamaged) disarms it too.
        if kind is None or getattr(value, "keeps_frozen", False):
            os.write(self.writer, DISARM)
        # After a failure CRIU may still be dumping (a signal cut the call short), and it
        # re-freezes the cgroup when done: the guardian thaws once CRIU is gone, and this
        # process returns only then.
        os.close(self.writer)
        self.process.wait()


def main(argv: list[str]) -> int:
    """The guardian process: argv[1] is the freezer's control file, argv[2] what thaws it, argv[3] the command to
    run before the thaw, as JSON {"argv": [...], "timeout": s} (or ""), then maybe the archive's partial file and its
    final path; the pipe is on stdin."""
    control, thawed, connecting = Path(argv[1]), argv[2], argv[3]
    # A container that was ended meanwhile has nothing left to thaw.
    if os.read(0, len(DISARM)) == DISARM or not control.exists():
        return 0
    if len(argv) == 6 and _linked(Path(argv[4]), Path(argv[5])):
        print(
            f"kerrickpt guardian: the archive {argv[5]} is complete; {control.parent} stays frozen: "
            "`kerrickpt recover NAME` thaws it, `kerrickpt kill NAME` ends it",
            file=sys.stderr,
        )
        return 0
    failed = 0
    if connecting:
        # Before the thaw, as netlinks.connect does for a checkpoint's cut-off (here without the package: see
        # Guardian): a container never runs cut off. Should this fail, `kerrickpt recover NAME` connects it again.
        order = json.loads(connecting)
        said = " ".join(order["argv"])
        try:
            done = subprocess.run(order["argv"], stdin=subprocess.DEVNULL, timeout=order["timeout"], check=False)
            failed = int(done.returncode != 0)
        except (OSError, subprocess.TimeoutExpired) as exc:
            said, failed = f"{said}: {exc}", 1
        if failed:
            print(f"kerrickpt guardian: could not connect ({said}): `kerrickpt recover NAME` does", file=sys.stderr)
    try:
        control.write_text(thawed)
    except OSError as exc:
        print(f"kerrickpt guardian: could not thaw {control.parent}: {exc}", file=sys.stderr)
        return 1
    return failed


def _linked(partial: Path, final: Path) -> bool:
    """Whether the archive was put in place: the final path is the partial file itself."""
    try:
        return os.path.samefile(partial, final)
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv))
