"""Progress lines: time formatting, throttling off a terminal, redraw on one, ETA, silence when disabled."""

from __future__ import annotations

import io

import pytest

from quant_release import progress as progress_module
from quant_release.progress import Progress, format_seconds


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0:00:00"),
        (0.4, "0:00:00"),
        (0.6, "0:00:01"),
        (59, "0:00:59"),
        (60, "0:01:00"),
        (61.2, "0:01:01"),
        (3599, "0:59:59"),
        (3600, "1:00:00"),
        (3 * 3600 + 25 * 60 + 7, "3:25:07"),
        (100 * 3600, "100:00:00"),
        (-5, "0:00:00"),
    ],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_non_tty_prints_first_and_last_step_and_throttles_between(clock: FakeClock) -> None:
    stream = io.StringIO()
    progress = Progress(stream=stream, interval=5.0)
    assert progress.tty is False
    total = 100
    for done in range(1, total + 1):
        progress.step("evaluate", "bf16", done, total)
        clock.advance(0.1)  # 10 s over the 100 steps: two intervals' worth
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[evaluate] bf16 1/100")
    assert lines[-1].startswith("[evaluate] bf16 100/100")
    # First, one line per 5 s (at ~5 s and ~10 s), and the last: never one per step.
    assert 3 <= len(lines) <= 4, lines
    assert "\r" not in stream.getvalue()
    assert all(line.startswith("[evaluate] bf16 ") for line in lines)


def test_non_tty_prints_again_after_interval(clock: FakeClock) -> None:
    stream = io.StringIO()
    progress = Progress(stream=stream, interval=5.0)
    progress.step("quantize", "calibration", 1, 10)
    clock.advance(4.9)
    progress.step("quantize", "calibration", 2, 10)
    assert len(stream.getvalue().splitlines()) == 1
    clock.advance(0.2)
    progress.step("quantize", "calibration", 3, 10)
    assert stream.getvalue().splitlines()[-1].startswith("[quantize] calibration 3/10")
    assert len(stream.getvalue().splitlines()) == 2


def test_a_new_step_prints_its_first_line_at_once(clock: FakeClock) -> None:
    stream = io.StringIO()
    progress = Progress(stream=stream, interval=5.0)
    progress.step("evaluate", "bf16", 1, 10)
    clock.advance(0.1)
    progress.step("evaluate", "fp8", 1, 10)
    assert [line.split()[1] for line in stream.getvalue().splitlines()] == ["bf16", "fp8"]


def test_eta_from_the_pace_so_far(clock: FakeClock) -> None:
    stream = io.StringIO()
    progress = Progress(stream=stream, interval=5.0)
    progress.step("benchmark", "fp8", 0, 40)
    clock.advance(30.0)
    progress.step("benchmark", "fp8", 10, 40)  # 3 s per unit, 30 units left: 90 s
    last = stream.getvalue().splitlines()[-1]
    assert last == "[benchmark] fp8 10/40  25.0%  ETA 0:01:30"


def test_no_eta_on_first_and_last_line(clock: FakeClock) -> None:
    stream = io.StringIO()
    progress = Progress(stream=stream, interval=5.0)
    progress.step("build", "probe", 0, 4)
    clock.advance(10)
    progress.step("build", "probe", 4, 4)
    lines = stream.getvalue().splitlines()
    assert lines == ["[build] probe 0/4   0.0%", "[build] probe 4/4 100.0%"]


def test_tty_redraws_in_place(clock: FakeClock) -> None:
    stream = TtyStream()
    progress = Progress(stream=stream, interval=5.0)
    assert progress.tty is True
    for done in range(1, 6):
        progress.step("evaluate", "bf16", done, 5)
        clock.advance(0.01)  # well inside the interval: a terminal still redraws every step
    text = stream.getvalue()
    assert text.count("\r\033[K") == 5
    assert text.count("\n") == 1  # only the finished step ends its line
    assert text.endswith("[evaluate] bf16 5/5 100.0%\n")


def test_tty_closes_an_open_line_before_a_note(clock: FakeClock) -> None:
    stream = TtyStream()
    progress = Progress(stream=stream)
    progress.step("evaluate", "bf16", 1, 5)
    progress.note("evaluate", "switching to fp8")
    text = stream.getvalue()
    assert text == "\r\033[K[evaluate] bf16 1/5  20.0%\n\r\033[K[evaluate] switching to fp8\n"


def test_stage_lines(clock: FakeClock) -> None:
    stream = io.StringIO()
    progress = Progress(stream=stream)
    progress.stage_started("quantize", "64 samples")
    progress.stage_finished("quantize", "completed", 75.0)
    progress.stage_finished("build", "failed", 1.0, "ValueError: bad")
    assert stream.getvalue().splitlines() == [
        "[quantize] started: 64 samples",
        "[quantize] completed in 0:01:15",
        "[build] failed in 0:00:01  ValueError: bad",
    ]


def test_bound_step_reports_to_its_stage(clock: FakeClock) -> None:
    stream = io.StringIO()
    callback = Progress(stream=stream).bound_step("evaluate", "fp8")
    callback(3, 3)
    assert stream.getvalue() == "[evaluate] fp8 3/3 100.0%\n"


@pytest.mark.parametrize("stream_type", [io.StringIO, TtyStream])
def test_disabled_prints_nothing(clock: FakeClock, stream_type: type[io.StringIO]) -> None:
    stream = stream_type()
    progress = Progress(stream=stream, enabled=False)
    progress.stage_started("download")
    progress.note("download", "hello")
    for done in range(11):
        progress.step("download", "files", done, 10)
        clock.advance(10)
    progress.stage_finished("download", "completed", 3.0)
    assert stream.getvalue() == ""


def test_sink_gets_log_paced_lines_even_on_a_terminal_and_when_quiet(clock: FakeClock) -> None:
    """The sink (Prefect's run log inside a flow run) gets what a log file would: not every redraw of a
    terminal, and the lines still when the terminal output is switched off with -q."""
    lines: list[str] = []
    stream = TtyStream()
    progress = Progress(stream=stream, interval=5.0, enabled=False, sink=lines.append)
    progress.stage_started("evaluate")
    for done in range(1, 11):
        clock.advance(1.0)
        progress.step("evaluate", "questions", done, 10)
    progress.stage_finished("evaluate", "completed", 10.0)
    assert stream.getvalue() == ""
    assert lines == [
        "[evaluate] started",
        "[evaluate] questions 1/10  10.0%",  # the step starts here: no pace yet
        "[evaluate] questions 6/10  60.0%  ETA 0:00:03",  # 6 done in the 5 s since the first call, 4 left
        "[evaluate] questions 10/10 100.0%",
        "[evaluate] completed in 0:00:10",
    ]


class Board:
    """A progress board that keeps every update, as Prefect's artifacts would show them in turn."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.updates: list[tuple[str, float, str]] = []
        self.fail_after = fail_after

    def update(self, stage: str, percent: float, description: str) -> None:
        if self.fail_after is not None and len(self.updates) >= self.fail_after:
            raise ConnectionError("prefect server went away")
        self.updates.append((stage, percent, description))


def test_board_shows_a_stage_at_its_first_step_then_once_per_interval_and_100_at_the_end(clock: FakeClock) -> None:
    board = Board()
    progress = Progress(stream=io.StringIO(), interval=5.0, board=board)
    progress.stage_started("evaluate")
    for done in range(1, 21):
        clock.advance(1.0)
        progress.step("evaluate", "bf16 questions", done, 20)
    for done in range(1, 11):  # a second step of the same stage: same board entry, still paced
        clock.advance(1.0)
        progress.step("evaluate", "fp8 questions", done, 10)
    progress.stage_finished("evaluate", "completed", 30.0)
    assert board.updates == [
        ("evaluate", 5.0, "bf16 questions 1/20"),  # no pace yet: no ETA
        ("evaluate", 30.0, "bf16 questions 6/20, ETA 0:00:12"),  # 6 done in the 5 s since the first call, 14 left
        ("evaluate", 55.0, "bf16 questions 11/20, ETA 0:00:08"),
        ("evaluate", 80.0, "bf16 questions 16/20, ETA 0:00:04"),
        ("evaluate", 10.0, "fp8 questions 1/10"),
        ("evaluate", 60.0, "fp8 questions 6/10, ETA 0:00:03"),
        ("evaluate", 100.0, "completed in 0:00:30"),
    ]


def test_board_keeps_a_failed_stage_at_the_value_it_reached(clock: FakeClock) -> None:
    board = Board()
    progress = Progress(stream=io.StringIO(), interval=5.0, board=board)
    progress.step("quantize", "calibration batches", 3, 8)
    progress.stage_finished("quantize", "failed", 12.0, "RuntimeError: NaN")
    assert board.updates == [
        ("quantize", 37.5, "calibration batches 3/8"),
        ("quantize", 37.5, "failed in 0:00:12: RuntimeError: NaN"),
    ]


def test_board_is_not_used_for_stages_without_steps(clock: FakeClock) -> None:
    board = Board()
    progress = Progress(stream=io.StringIO(), board=board)
    progress.stage_started("download")
    progress.note("download", "cached")
    progress.stage_finished("download", "completed", 1.0)
    assert board.updates == []


def test_a_failing_board_is_one_note_and_never_stops_the_stage(clock: FakeClock) -> None:
    board = Board(fail_after=1)
    stream = io.StringIO()
    progress = Progress(stream=stream, interval=5.0, board=board)
    for done in range(1, 31):
        clock.advance(1.0)
        progress.step("benchmark", "fp8 requests", done, 30)
    progress.stage_finished("benchmark", "completed", 30.0)
    assert board.updates == [("benchmark", 100 / 30, "fp8 requests 1/30")]
    notes = [line for line in stream.getvalue().splitlines() if "progress artifacts" in line]
    assert notes == ["[benchmark] progress artifacts off for this run: ConnectionError: prefect server went away"]
    assert stream.getvalue().splitlines()[-1] == "[benchmark] completed in 0:00:30"
