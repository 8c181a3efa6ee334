from __future__ import annotations

import subprocess
import sys

import pytest

from radpretrain.cli import build_parser, main


def test_help_lists_and_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, parser in sub.choices.items():  # type: ignore[attr-defined]
        assert name in out
        assert parser.description, f"`radpretrain {name} --help` has no description"
        with pytest.raises(SystemExit) as sub_exit:
            main([name, "--help"])
        assert sub_exit.value.code == 0


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_console_entry_point_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "radpretrain", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.startswith("radpretrain ")
