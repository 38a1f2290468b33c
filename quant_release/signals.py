"""Interrupts end a run cleanly: SIGTERM (what CI and Kubernetes send) and SIGINT (Ctrl-C) both unwind the
run as an exception, so the stage's private directory is removed, the MLflow runs end as KILLED and the
summary is written; the CLI then prints one line and exits 128 + the signal number (143, 130).

Further signals while that cleanup runs are ignored: it is short, and the SIGKILL that follows a grace
period still ends it. What a SIGKILL leaves behind is swept by the next run (quant_release/sweep.py).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType


class Interrupted(BaseException):
    """The run was stopped by a signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum: int, frame: FrameType | None) -> None:
    del frame
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # one interrupt is enough; let the cleanup finish
    raise Interrupted(signum)


def install() -> None:
    """Turn SIGINT and SIGTERM into `Interrupted` in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def is_interrupt(error: BaseException | None) -> bool:
    """A signal stopped the run: ours, Ctrl-C, or the SIGTERM by which a Prefect worker cancels a flow run
    (Prefect turns it into `TerminationSignal` inside a flow run; prefect is imported only if already loaded)."""
    if isinstance(error, (Interrupted, KeyboardInterrupt)):
        return True
    if error is None or "prefect" not in sys.modules:
        return False
    from prefect.exceptions import TerminationSignal

    return isinstance(error, TerminationSignal)
