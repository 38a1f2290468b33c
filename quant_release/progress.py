"""Progress lines while a run goes: which stage, which step, how far, and an ETA.

On a terminal the current line is redrawn in place; elsewhere (CI logs, Prefect workers) a line is
printed at most every `interval` seconds, plus the first and the last step, so logs stay short.

A `sink` gets the same lines at the same pace as a log file would, whatever the stream is and even when
the stream is switched off (`-q`): inside a Prefect flow run it is the run's logger (quant_release/prefect_ui.py),
so the Logs tab shows stage, step and ETA.

A `board` shows each stage that has steps as one value from 0 to 100 with a description (step and ETA):
inside a Prefect flow run, the stage's progress artifact (quant_release/prefect_ui.py). It is updated at
most every `interval` seconds, and set to 100 when the stage completes. It only reports: the first error it
raises is one note, and the board is not used again in this run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from quant_release.errors import error_message


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressBoard(Protocol):
    """Where a stage's progress is shown as one value (Prefect's progress artifact inside a flow run)."""

    def update(self, stage: str, percent: float, description: str) -> None: ...


class Progress:
    def __init__(
        self,
        stream: TextIO | None = None,
        interval: float = 5.0,
        enabled: bool = True,
        sink: Callable[[str], None] | None = None,
        board: ProgressBoard | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = enabled
        self.sink = sink
        self.board = board
        self._last_sink = 0.0
        self._board_shown: dict[str, tuple[float, float]] = {}  # stage -> (monotonic time, percent) last shown
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._step_key: tuple[str, str] | None = None
        self._step_started = 0.0
        self._last_print = 0.0
        self._open_line = False

    def _write(self, text: str, final: bool, to_sink: bool = True) -> None:
        if self.sink is not None and to_sink:
            self.sink(text)
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self._open_line = not final
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _close_line(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False

    def stage_started(self, stage: str, detail: str = "") -> None:
        self._close_line()
        self._write(f"[{stage}] started{': ' + detail if detail else ''}", final=True)

    def stage_finished(self, stage: str, status: str, seconds: float, detail: str = "") -> None:
        self._close_line()
        self._write(f"[{stage}] {status} in {format_seconds(seconds)}{'  ' + detail if detail else ''}", final=True)
        shown = self._board_shown.pop(stage, None)
        if shown is not None:  # only stages that had steps have a place on the board
            # A failed stage keeps the value it reached: 100 would say it got through.
            percent = 100.0 if status == "completed" else shown[1]
            self._show(stage, percent, f"{status} in {format_seconds(seconds)}{': ' + detail if detail else ''}")

    def note(self, stage: str, message: str) -> None:
        self._close_line()
        self._write(f"[{stage}] {message}", final=True)

    def bound_step(self, stage: str, what: str) -> Callable[[int, int], None]:
        """A (done, total) callback for one stage and step, for engines and loops."""
        return lambda done, total: self.step(stage, what, done, total)

    def step(self, stage: str, what: str, done: int, total: int) -> None:
        """Report `done` of `total` units of `what`; ETA from the pace since this step began."""
        now = time.monotonic()
        if self._step_key != (stage, what):
            self._step_key = (stage, what)
            self._step_started = now
            self._last_print = 0.0
            self._last_sink = 0.0
        finished = done >= total
        self._board_step(stage, what, done, total, now)
        # The sink keeps a log's pace even when the stream is a terminal redrawn on every call.
        sink_due = finished or self._last_sink == 0.0 or now - self._last_sink >= self.interval
        if sink_due:
            self._last_sink = now
        if not (finished or self.tty or now - self._last_print >= self.interval or self._last_print == 0.0):
            if sink_due and self.sink is not None:
                self.sink(self._step_line(stage, what, done, total, now))
            return
        self._last_print = now
        self._write(self._step_line(stage, what, done, total, now), final=finished, to_sink=sink_due)

    def _step_line(self, stage: str, what: str, done: int, total: int, now: float) -> str:
        eta = self._eta(done, total, now)
        pct = f"{100 * done / total:5.1f}%" if total else ""
        return f"[{stage}] {what} {done}/{total} {pct}{'  ETA ' + eta if eta else ''}"

    def _eta(self, done: int, total: int, now: float) -> str:
        elapsed = now - self._step_started
        return format_seconds(elapsed / done * (total - done)) if 0 < done < total and elapsed > 0 else ""

    def _board_step(self, stage: str, what: str, done: int, total: int, now: float) -> None:
        """The stage's first step shows at once, then at most one update per `interval` (the last step's
        value may wait for the stage's end, which shows 100)."""
        if self.board is None:
            return
        shown = self._board_shown.get(stage)
        if shown is not None and now - shown[0] < self.interval:
            return
        percent = min(100.0, 100 * done / total) if total else 0.0
        eta = self._eta(done, total, now)
        self._board_shown[stage] = (now, percent)
        self._show(stage, percent, f"{what} {done}/{total}{', ETA ' + eta if eta else ''}")

    def _show(self, stage: str, percent: float, description: str) -> None:
        if self.board is None:
            return
        try:
            self.board.update(stage, percent, description)
        except Exception as exc:
            self.board = None
            self.note(stage, f"progress artifacts off for this run: {error_message(exc)}")
