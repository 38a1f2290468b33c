"""`quant-release stack` on bad input, through the real console script: one line, the documented exit code,
and nothing started. No server runs here (tests/integration/test_stack.py starts the real stack)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from quant_release.stack import default_dir, export_lines
from tests.support.process import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "quant-release"


def stack_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "stack", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--s3-port", "70000"], "--s3-port 70000: not a TCP port (1-65535)"),
        (["--prefect-port", "0"], "--prefect-port 0: not a TCP port (1-65535)"),
        (["--timeout", "0"], "--timeout 0.0: must be positive"),
        (["--s3-port", "PORT", "--mlflow-port", "PORT"], "the stack's ports must differ"),
    ],
)
def test_bad_up_options_are_one_line_and_start_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    port = str(free_port())
    state_dir = tmp_path / "state"
    result = stack_cli("up", "--dir", str(state_dir), *(port if arg == "PORT" else arg for arg in args))
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"quant-release: error: {message}"), line
    assert result.stdout == ""
    assert not state_dir.exists() or not list(state_dir.glob("*.pid"))


def test_an_unwritable_state_dir_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = stack_cli("up", "--dir", str(blocker / "stack"))
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"quant-release: error: stack directory {blocker / 'stack'} is not writable"), line


@pytest.mark.parametrize("action", ["status", "env"])
def test_status_and_env_without_a_stack_fail_in_one_line(tmp_path: Path, action: str) -> None:
    result = stack_cli(action, "--dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"quant-release: error: no stack is running in {tmp_path}" + (
        "; start one with quant-release stack up" if action == "env" else ""
    )]  # fmt: skip


def test_down_without_a_stack_stops_nothing(tmp_path: Path) -> None:
    result = stack_cli("down", "--dir", str(tmp_path / "never-started"))
    assert result.returncode == 0
    assert result.stdout.startswith("stopped: nothing was running")


def test_the_state_dir_comes_from_the_environment_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUANT_RELEASE_STACK_DIR", str(tmp_path / "explicit"))
    assert default_dir() == tmp_path / "explicit"
    monkeypatch.setenv("QUANT_RELEASE_STACK_DIR", "")  # empty counts as unset, as for every QUANT_RELEASE_ variable
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "quant-release" / "stack"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_dir() == tmp_path / "home" / ".local" / "state" / "quant-release" / "stack"


def test_export_lines_survive_the_shell() -> None:
    env = {"A_URL": "http://127.0.0.1:1/api", "SECRET": "it's $HOME; `x`"}
    text = export_lines(env)
    script = f'{text}\nprintf \'%s\\0\' "$A_URL" "$SECRET"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, timeout=10)
    assert result.stdout.split("\0")[:2] == list(env.values())
    assert shlex.split(text.splitlines()[1].partition("=")[2]) == [env["SECRET"]]


def test_a_damaged_stack_record_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text("{not json")
    result = stack_cli("status", "--dir", str(tmp_path))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"quant-release: error: {tmp_path / 'stack.json'} is not a stack record"), line
