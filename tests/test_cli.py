"""The `llava-pipeline` command line: a key that does not exist is one line naming the valid choices and exit
status 2 (no traceback, nothing run); `--version`; the result on stdout, messages through logging on stderr."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from llava_core.cli import main
from llava_core.params import params_reference
from tests.helpers_unit import base_params, write_params


@pytest.fixture
def params(tmp_path) -> Path:
    return write_params(tmp_path, base_params(tmp_path / "ws"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["download", "nosuch"], "unknown source 'nosuch'; valid: synthetic_shapes"),
        (["convert", "nosuch"], "unknown dataset 'nosuch'; valid: shapes_pretrain, shapes_instruct"),
        (["hdf5", "phase3"], "unknown phase 'phase3'; valid: phase1, phase2"),
        (["validate", "phase0"], "unknown phase 'phase0'; valid: phase1, phase2"),
        (["train", "phase3"], "unknown phase 'phase3'; valid: phase1, phase2"),
    ],
)
def test_an_unknown_key_is_one_line_naming_the_valid_choices(params, capsys, args, message):
    assert main(["--params", str(params), *args]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n" and captured.out == ""
    assert not (params.parent / "ws").exists()  # nothing ran


def test_the_installed_command_says_it_without_a_traceback(params, venv_env):
    """The console script as DVC runs it: exit status 2 and the one line on stderr."""
    for args, message in (
        (["download", "nosuch"], "error: unknown source 'nosuch'; valid: synthetic_shapes"),
        (["hdf5", "phase3"], "error: unknown phase 'phase3'; valid: phase1, phase2"),
    ):
        proc = subprocess.run(
            ["llava-pipeline", "--params", str(params), *args], env=venv_env, capture_output=True, text=True
        )
        assert (proc.returncode, proc.stderr, proc.stdout) == (2, message + "\n", ""), proc.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"llava-pipeline {version('llava-pipeline')}\n"


def test_the_result_goes_to_stdout_and_messages_to_stderr(params, capsys):
    assert main(["--params", str(params), "download", "synthetic_shapes"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout holds the JSON result only
    assert result["source"] == "synthetic_shapes" and Path(result["path"]).is_dir()
    assert main(["--params", str(params), "params"]) == 0
    assert capsys.readouterr().out == params_reference()


def test_quiet_and_verbose_set_the_level_here_and_in_the_training_process(params, capsys, monkeypatch):
    monkeypatch.delenv("LLAVA_LOG_LEVEL", raising=False)  # main() sets it for the processes it starts
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # restored afterwards
    for flags, level in ((["-v"], logging.DEBUG), (["-q"], logging.WARNING), ([], logging.INFO)):
        assert main(["--params", str(params), *flags, "download", "synthetic_shapes"]) == 0
        assert root.level == level and os.environ["LLAVA_LOG_LEVEL"] == logging.getLevelName(level)
    # an error is said even with -q
    capsys.readouterr()
    assert main(["--params", str(params), "-q", "hdf5", "phase3"]) == 2
    assert capsys.readouterr().err == "error: unknown phase 'phase3'; valid: phase1, phase2\n"


def test_a_missing_params_file_is_exit_2(tmp_path, capsys):
    assert main(["--params", str(tmp_path / "absent.yaml"), "download", "x"]) == 2
    assert capsys.readouterr().err == f"error: params file not found: {tmp_path.resolve() / 'absent.yaml'}\n"
