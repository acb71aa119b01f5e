"""Running `mae` commands in the test process (fast: no interpreter start-up) and
what a hostile-input test checks about their output."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from train.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The one line a failed command prints (``mae: error: ...``)."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mae: error: "), self.err
        return lines[0]


def run_mae(capsys: pytest.CaptureFixture, *argv: str) -> Result:
    capsys.readouterr()  # drop what earlier steps printed
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)
