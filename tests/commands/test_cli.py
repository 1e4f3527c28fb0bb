import subprocess
import sys

from cm3leon.cli import COMMAND_MODULES, build_parser


def test_help_runs():
    out = subprocess.run([sys.executable, "-m", "cm3leon.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "cm3leon" in out.stdout


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert COMMAND_MODULES  # registry exists
    for name, p in sub.choices.items():
        assert p.format_help(), name
