"""Running external programs: what a user sees of one that failed is the tail of what it said."""

from __future__ import annotations

import subprocess
import sys
import tempfile

from kerrickpt import command


def test_the_tail_of_a_program_s_stderr_is_its_last_lines_read_from_the_end_of_the_file() -> None:
    with tempfile.TemporaryFile() as errors:
        # 200,000 lines (some 2.6 MiB) before the last ones: a program that went on for long.
        program = "import sys\nfor i in range(200_020): sys.stderr.write(f'line {i}\\n')"
        subprocess.run([sys.executable, "-c", program], stderr=errors, check=True)
        sizes: list[int] = []
        read = errors.read
        errors.read = lambda size=-1: (data := read(size), sizes.append(len(data)))[0]  # type: ignore[method-assign]

        said = command.tail_of(errors)

    assert said.splitlines() == [f"line {i}" for i in range(200_000, 200_020)]
    assert sizes and sum(sizes) <= command.TAIL_BYTES
