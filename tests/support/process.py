"""Start a real server as a child process on a free loopback port, wait until it answers, stop it by PID.

Every server fixture (SeaweedFS, MLflow, Prefect, the Hub test server) goes through here so that
start-up failures show the server's own log instead of a bare timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when `url` answers with a 2xx status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it does not go in time."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def start_server(
    name: str,
    argv: Sequence[str],
    *,
    ready: Callable[[], bool],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> ServerProcess:
    """Launch `argv` in its own process group and poll `ready` until it returns True.

    Raises RuntimeError with the server's log tail if it exits or does not become ready in time.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    process = subprocess.Popen(
        list(argv),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=str(cwd) if cwd else None,
        start_new_session=True,  # own process group: stop() takes its children with it
    )
    log_file.close()
    server = ServerProcess(name=name, process=process, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {process.returncode} before it was ready:\n{server.log_tail()}"
            )
        if ready():
            return server
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{name} was not ready after {timeout:.0f}s:\n{server.log_tail()}")


@contextlib.contextmanager
def running_server(
    name: str,
    argv: Sequence[str],
    *,
    ready: Callable[[], bool],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> Iterator[ServerProcess]:
    server = start_server(name, argv, ready=ready, log_dir=log_dir, env=env, cwd=cwd, timeout=timeout)
    try:
        yield server
    finally:
        server.stop()
