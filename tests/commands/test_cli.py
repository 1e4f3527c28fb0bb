import argparse
import importlib
import subprocess
import sys

from cm3leon.cli import COMMAND_MODULES, build_parser


def test_help_runs():
    out = subprocess.run([sys.executable, "-m", "cm3leon.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "cm3leon" in out.stdout


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, one-line help in the parent's listing, parser) of every subcommand, nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), listed.get(name), sub
                yield from _subcommands(sub, (*path, name))


def test_every_subcommand_has_help():
    for name in COMMAND_MODULES:  # build_parser skips a missing module silently: none is missing
        assert callable(importlib.import_module(f"cm3leon.commands.{name}").register), name
    found = list(_subcommands(build_parser()))
    assert any(len(path) == 2 for path, _, _ in found)  # nested subcommands (data shapes, ...) are walked
    for path, listed, sub in found:
        command = "cm3leon " + " ".join(path)
        assert listed and listed.strip(), f"{command}: no one-line help in its parent's --help"
        assert sub.description and sub.description.strip(), f"{command}: no description in its --help"
