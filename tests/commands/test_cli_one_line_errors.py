"""CLI errors are one ``error: ...`` line on stderr, without a traceback, however the CLI is
started: the ``cm3leon`` script or ``python -m cm3leon.cli`` (what the torchrun docs use).
``--debug`` / ``CM3LEON_DEBUG=1`` show the traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cm3leon.train.recipes import get_recipe

SCRIPT = Path(sys.executable).with_name("cm3leon")


def _run(args: list[str], *, module: bool = True, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cm3leon.cli", *args] if module else [str(SCRIPT), *args]
    full_env = {k: v for k, v in os.environ.items() if k != "CM3LEON_DEBUG"}
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full_env, cwd=cwd)


def _assert_one_error_line(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and needle in lines[0], r.stderr


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    d = get_recipe("smoke").to_dict()
    d["model_overrides"]["d_model"] = "sixty-four"
    d["train"]["lr"] = "inf"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("module", [True, False], ids=["python-m", "script"])
def test_bad_config_file_is_one_line(tmp_path, bad_config, module):
    if not module and not SCRIPT.exists():
        pytest.skip("the cm3leon console script is not installed next to this python")
    r = _run(["train", "--config", str(bad_config), "--out", str(tmp_path / "x")], module=module)
    _assert_one_error_line(r, "error: invalid run config: model_overrides.d_model must be a whole number >= 1 "
                              "(got 'sixty-four'); train.lr must be a positive finite number (got 'inf')")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("override, needle", [
    ("lr=nan", "train.lr must be a positive finite number (got 'nan')"),
    ("lr=inf", "train.lr must be a positive finite number (got 'inf')"),
    ("steps=ten", "train.steps must be a whole number >= 1 (got 'ten')"),
    ("batch_size=0", "train.batch_size must be a whole number >= 1 or null (got 0)"),
])
def test_bad_override_is_one_line(tmp_path, override, needle):
    r = _run(["train", "--recipe", "smoke", "--out", str(tmp_path / "x"), "--override", override])
    _assert_one_error_line(r, needle)


def test_errors_raised_by_commands_are_one_line_under_python_m(tmp_path):
    """The commands raise cm3leon.cli.CLIError; under ``python -m`` that is still the class main catches."""
    r = _run(["serve", "--model", str(tmp_path), "--port", "0"])
    _assert_one_error_line(r, "--port must be in 1..65535, got 0")
    r = _run(["train", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")])
    _assert_one_error_line(r, f"{tmp_path / 'missing.json'} not found")


def test_debug_shows_the_traceback(tmp_path, bad_config):
    args = ["train", "--config", str(bad_config), "--out", str(tmp_path / "x")]
    for r in (_run(["--debug", *args]), _run(args, env={"CM3LEON_DEBUG": "1"})):
        assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr
