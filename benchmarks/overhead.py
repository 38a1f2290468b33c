"""What a run costs when there is nothing to do: a fully cached `quant-release run`, `--help`, a bad flag.

    python benchmarks/overhead.py --state-dir /tmp/qr-overhead --label after \
        --out benchmarks/results/overhead-cpu.json

The state dir is filled by one unmeasured `quant-release run` if it holds no finished run yet; then:

* wall time (median of --repeats) of `quant-release --help`, `quant-release run --help`, a bad flag, and
  the fully cached `quant-release run` (checked: every stage `cached`);
* one more cached run in a child process that times its phases: interpreter start, importing the CLI,
  importing the pipeline, preflight, MLflow tracker start, each cached stage, recording the summary, and
  what happens between them (e.g. starting a Prefect server); with `python -X importtime`, the import
  time of each package that our code imports directly, by the phase that imported it.

Results go under `--label` into the JSON file (other labels in it are kept), with the device and versions.
To measure another checkout of the code (e.g. the one before a change), put it first on PYTHONPATH:
`git archive REV | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python benchmarks/overhead.py --label before ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("quant-release"))
# Packages whose import time is worth naming; the rest is summed as "other".
HEAVY = ("torch", "transformers", "modelopt", "deepspeed", "prefect", "mlflow", "datasets", "boto3", "gguf")
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$")


# --------------------------------------------------------------------------------------- the child


def child(events_file: Path, argv: list[str]) -> int:
    """Run `quant-release ARGV` in this process with timing wrappers around the pipeline's phases."""
    events: list[dict[str, Any]] = [{"name": "child_start", "t": time.time()}]

    def mark(name: str) -> None:
        events.append({"name": name, "t": time.time()})

    def timed(owner: Any, attribute: str, name: Callable[..., str]) -> None:
        original = getattr(owner, attribute)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            label = name(*args, **kwargs)
            start = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                events.append({"name": label, "start": start, "end": time.time()})

        setattr(owner, attribute, wrapper)

    import flows.cli

    mark("cli_imported")
    import importlib

    import quant_release.stage
    import quant_release.tracking

    # The module with the run's body, in the measured checkout: flows/pipeline.py, or before it existed
    # flows/release.py.
    has_pipeline = Path(flows.cli.__file__).with_name("pipeline.py").is_file()
    body = importlib.import_module("flows.pipeline" if has_pipeline else "flows.release")
    mark("pipeline_imported")
    timed(body, "preflight", lambda *a, **k: "preflight")
    timed(body, "run_release", lambda *a, **k: "run_release")
    timed(body, "_finish", lambda *a, **k: "finish")
    timed(quant_release.tracking.Tracker, "__init__", lambda *a, **k: "tracker_start")
    timed(quant_release.tracking.Tracker, "start", lambda *a, **k: "tracker_start")
    timed(quant_release.stage.StageRunner, "run", lambda self, stage, *a, **k: f"stage:{stage}")
    mark("main_start")
    code = flows.cli.main(argv)
    mark("main_end")
    events_file.write_text(json.dumps(events))
    return code


# -------------------------------------------------------------------------------------- the parent


def _run(argv: list[str], env: dict[str, str] | None = None, check_code: int | None = 0) -> tuple[float, str, str]:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=1800)
    seconds = time.perf_counter() - start
    if check_code is not None and result.returncode != check_code:
        raise SystemExit(f"{argv} exited {result.returncode}, expected {check_code}:\n{result.stderr[-3000:]}")
    return seconds, result.stdout, result.stderr


def _median(samples: list[float]) -> dict[str, Any]:
    return {"median_s": round(statistics.median(samples), 3), "samples_s": [round(s, 3) for s in samples]}


def _all_cached(summary_file: Path) -> bool:
    summary = json.loads(summary_file.read_text())
    return {report["status"] for report in summary["stages"].values()} <= {"cached", "skipped"}


def _imports_by_package(stderr: str) -> dict[str, float]:
    """Seconds of imports that our code started (depth 0 in -X importtime), by top-level package."""
    seconds: dict[str, float] = {}
    for line in stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if not match or match.group(3):  # nested imports are inside their importer's cumulative time
            continue
        package = match.group(4).split(".")[0]
        name = package if package in HEAVY else "other"
        seconds[name] = seconds.get(name, 0.0) + int(match.group(2)) / 1e6
    return {name: round(value, 3) for name, value in sorted(seconds.items(), key=lambda kv: -kv[1])}


def _phases(events: list[dict[str, Any]], spawned: float, exited: float) -> dict[str, float]:
    """Seconds per phase of the child's run. Time between timed phases is `outside_run_release` (the CLI
    around the flow's body: in older code a first preflight's neighbours and a Prefect flow run on a
    temporary server) or `untimed_in_run_release` (the flow's body between its timed phases)."""
    marks = {e["name"]: e["t"] for e in events if "t" in e}
    (body,) = [e for e in events if e.get("name") == "run_release"]
    spans = sorted((e for e in events if "start" in e and e["name"] != "run_release"), key=lambda e: e["start"])
    phases: dict[str, float] = {
        "python_start": marks["child_start"] - spawned,
        "import_cli": marks["cli_imported"] - marks["child_start"],
        "import_pipeline": marks["pipeline_imported"] - marks["cli_imported"],
    }

    def add(name: str, seconds: float) -> None:
        if seconds > 0:
            phases[name] = phases.get(name, 0.0) + seconds

    def add_gap(start: float, end: float) -> None:
        inside = max(0.0, min(end, body["end"]) - max(start, body["start"]))
        add("untimed_in_run_release", inside)
        add("outside_run_release", (end - start) - inside)

    cursor = marks["main_start"]
    for span in spans:
        if span["start"] < cursor:
            continue  # nested in a phase already counted
        add_gap(cursor, span["start"])
        add(span["name"], span["end"] - span["start"])
        cursor = span["end"]
    add_gap(cursor, marks["main_end"])
    add("interpreter_exit", exited - marks["main_end"])
    return {name: round(value, 3) for name, value in phases.items()}


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for name in ("quant-release", "torch", "transformers", "nvidia-modelopt", "prefect", "mlflow", "deepspeed"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _device() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}, no GPU used"


def _code_revision() -> str:
    pythonpath = os.environ.get("PYTHONPATH")
    where = Path(pythonpath.split(os.pathsep)[0]) if pythonpath else ROOT
    try:
        rev = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain"], capture_output=True, text=True, check=True
        )
        return rev + ("+changes" if dirty.stdout.strip() else "")
    except (subprocess.CalledProcessError, OSError):
        return f"export at {where}"


def measure(state_dir: Path, repeats: int, extra: list[str]) -> dict[str, Any]:
    env = {**os.environ, "QUANT_RELEASE_STATE_DIR": str(state_dir), "TQDM_DISABLE": "1"}
    run = [CLI, "run", "--state-dir", str(state_dir), *extra]
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        seconds, _, _ = _run([*run, "--summary-json", str(summary)], env)
        if not _all_cached(summary):
            print(f"primed {state_dir} in {seconds:.0f} s (not every stage was finished)", file=sys.stderr)
            _run([*run, "--summary-json", str(summary)], env)
            if not _all_cached(summary):
                raise SystemExit("a second run still did work: the state dir does not cache this run")

        results: dict[str, Any] = {"command": " ".join(["quant-release", "run", *extra]), "wall": {}}
        python_start = [_run([sys.executable, "-c", "pass"], env)[0] for _ in range(repeats)]
        results["wall"]["python -c pass"] = _median(python_start)
        for name, argv, code in (
            ("quant-release --help", [CLI, "--help"], 0),
            ("quant-release run --help", [CLI, "run", "--help"], 0),
            ("quant-release run --bad-flag", [CLI, "run", "--bad-flag"], 2),
        ):
            results["wall"][name] = _median([_run(argv, env, code)[0] for _ in range(repeats)])
        cached: list[float] = []
        for _ in range(repeats):
            seconds, _, _ = _run([*run, "--summary-json", str(summary)], env)
            if not _all_cached(summary):
                raise SystemExit("a measured run did work: not a fully cached rerun")
            cached.append(seconds)
        results["wall"]["cached quant-release run"] = _median(cached)

        events_file = Path(tmp) / "events.json"
        argv = [sys.executable, "-X", "importtime", __file__, "--child", str(events_file), "--", *run[1:]]
        spawned = time.time()
        _, _, stderr = _run(argv, env)
        exited = time.time()
        events = json.loads(events_file.read_text())
        results["phases_s"] = _phases(events, spawned, exited)
        results["phases_note"] = "one cached run under python -X importtime (which adds its own overhead)"
        results["imports_s"] = _imports_by_package(stderr)
        results["code"] = _code_revision()
        results["versions"] = _versions()
    return results


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        separator = sys.argv.index("--")
        return child(Path(sys.argv[2]), sys.argv[separator + 1 :])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, required=True, help="a state dir for the cached run")
    parser.add_argument("--label", required=True, help="e.g. before / after: the key of these results")
    parser.add_argument("--out", type=Path, required=True, help="JSON file (other labels in it are kept)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--code", help="what code was measured (default: git revision of the checkout)")
    parser.add_argument("extra", nargs="*", help="extra `quant-release run` options (after --)")
    args = parser.parse_args()
    results = measure(args.state_dir.resolve(), args.repeats, args.extra)
    if args.code:
        results["code"] = args.code
    data: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data.update({"benchmark": "overhead", "device": _device()})
    data.setdefault("results", {})[args.label] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data["results"][args.label], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
