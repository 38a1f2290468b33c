"""`quant-release`: the command line. Its options are generated from `ReleaseConfig`.

Precedence: model defaults < `--config FILE` (YAML) < flags. Endpoints and secrets come from the
environment only (see `quant-release run --help`, "environment").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from flows.plan import add_machine_options
from quant_release import __version__
from quant_release.config import ReleaseConfig, build_config, load_config_file
from quant_release.errors import ConfigError, QuantReleaseError, error_message
from quant_release.stages import STAGE_TABLE, STAGES

PROG = "quant-release"
ENVIRONMENT_HELP = """environment:
  QUANT_RELEASE_STATE_DIR     stage results and local stores (default .quant-release)
  QUANT_RELEASE_ARTIFACT_URI  s3://BUCKET/PREFIX or a directory (default STATE_DIR/artifacts)
  MLFLOW_TRACKING_URI         MLflow server or store (default sqlite:///STATE_DIR/mlflow.db)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL   S3 credentials and endpoint
  HF_TOKEN, HF_ENDPOINT       Hub token and endpoint (for Hub sources and --push-to-hub)
  HF_HUB_DISABLE_XET=1        upload through LFS, for Hub servers without Xet storage
  PREFECT_API_URL             a Prefect server; unset: runs directly, without Prefect
                              (`quant-release stack up` starts a local Prefect, MLflow and S3 and prints these)
  QUANT_RELEASE_NET_CONNECT_TIMEOUT, QUANT_RELEASE_NET_READ_TIMEOUT, QUANT_RELEASE_NET_RETRIES
                              time limits (s) and retries of Hub, S3 and MLflow calls (default 10, 60, 3)
  QUANT_RELEASE_NET_MLFLOW_OUTAGE  seconds of MLflow server outage a run rides out by retrying (default 60)

exit codes: 0 success, 1 a stage failed, 2 bad input, 3 upstream stage missing, 4 engine cannot run here,
  130/143 interrupted by SIGINT/SIGTERM (MLflow runs KILLED, summary written)
"""
EXIT_STAGE_FAILED = 1


def leaf_fields(
    model: type[BaseModel] = ReleaseConfig, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo, str]]:
    """(path in ReleaseConfig, field, flag) for every option, in sections nested to any depth
    (`engine.builtin.fp8_gemm` is `--fp8-gemm`)."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from leaf_fields(annotation, (*prefix, name))
        else:
            yield (*prefix, name), field, _flag(field)


def _flag(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if not isinstance(extra, dict) or not isinstance(extra.get("cli"), str):
        raise TypeError(f"field {field} has no CLI flag")
    return str(extra["cli"])


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _add_option(group: argparse._ArgumentGroup, path: tuple[str, ...], field: FieldInfo, flag: str) -> None:
    annotation = _unwrap_optional(field.annotation)
    dest = "opt__" + "__".join(path)
    default = field.get_default(call_default_factory=True)
    help_text = f"{field.description} (default: {default if default not in (None, []) else 'none'})"
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    origin = typing.get_origin(annotation)
    enum = field.json_schema_extra.get("enum") if isinstance(field.json_schema_extra, dict) else None
    # Former names of a renamed option keep working.
    aliases = field.json_schema_extra.get("aliases") if isinstance(field.json_schema_extra, dict) else None
    flags = [flag, *(str(a) for a in aliases)] if isinstance(aliases, list) else [flag]
    if isinstance(enum, list):  # choices from a registry (calibration sources, engines)
        kwargs["choices"] = [str(choice) for choice in enum]
        group.add_argument(*flags, **kwargs)
        return
    if annotation is bool:
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if origin is list:
        (item,) = typing.get_args(annotation)
        kwargs["nargs"] = "*"
        if typing.get_origin(item) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(item))
            kwargs["metavar"] = "{" + ",".join(typing.get_args(item)) + "}"
        else:
            kwargs["metavar"] = path[-1].upper().rstrip("S")
    elif origin is typing.Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
    elif annotation is int:
        kwargs["type"] = int
        kwargs["metavar"] = "N"
    elif annotation is float:
        kwargs["type"] = float
        kwargs["metavar"] = "X"
    else:
        kwargs["metavar"] = path[-1].upper()
    group.add_argument(*flags, **kwargs)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (`--stages quantise` names the valid choices); `--help` shows the usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _nonempty_path(value: str) -> Path:
    # Path("") is ".": an empty --state-dir would silently write into the current directory.
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(value)


def _common_options(parser: argparse.ArgumentParser) -> None:
    general = parser.add_argument_group("general")
    general.add_argument("--config", type=Path, metavar="FILE", help="YAML file with any of the options below")
    general.add_argument(
        "--summary-json", type=_nonempty_path, metavar="PATH", help="write the run summary here (checked first)"
    )
    general.add_argument(
        "--state-dir",
        type=_nonempty_path,
        metavar="DIR",
        help="stage results and local stores (env QUANT_RELEASE_STATE_DIR; default .quant-release)",
    )
    general.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    general.add_argument(
        "-v", "--verbose", action="store_true", help="show the libraries' own log lines and progress bars"
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, field, flag in leaf_fields():
        section = path[0] if len(path) > 1 else "run"
        if section not in groups:
            section_field = ReleaseConfig.model_fields.get(section)
            doc = (section_field.annotation.__doc__ or "") if section_field and section_field.annotation else ""
            groups[section] = parser.add_argument_group(section, doc.strip().split("\n")[0] or None)
        _add_option(groups[section], path, field, flag)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Turn a Hugging Face LLM into a published FP8 release: one tracked, resumable run.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="run the whole pipeline (finished stages are reused)",
        description=f"Run {' → '.join(STAGES)}. A stage that finished before with the same inputs (and the "
        "same code) is reused, not redone (see --rerun).",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_options(run)
    for spec in STAGE_TABLE:
        sub = commands.add_parser(
            spec.name,
            help=spec.help,
            description=f"Run only the {spec.name} stage: {spec.help}. Earlier stages must have finished "
            "with the same options (they are read back, not rerun).",
            epilog=ENVIRONMENT_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common_options(sub)
    plan = commands.add_parser(
        "plan",
        help="print the memory each stage needs per GPU, on the host and on disk; exit 2 if it cannot fit",
        description="From the model's config alone (no weights are downloaded): each stage's peak GPU memory "
        "per GPU, host memory and disk, where calibration places the model (one GPU, split over GPUs, or "
        "offloaded), and whether it fits this machine or the one --gpus/--gpu-memory/--host-memory describe. "
        "--model may also be a bare config.json. Every run checks the same plan at preflight.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_options(plan)
    add_machine_options(plan)
    show = commands.add_parser(
        "config",
        help="print the effective configuration as YAML (or its JSON schema)",
        description="Print the configuration that the same options would run with.",
    )
    _common_options(show)
    show.add_argument("--schema", action="store_true", help="print the JSON schema instead")
    compare = commands.add_parser(
        "compare",
        help="print two runs side by side from MLflow: params that differ, metrics with their change",
        description="Read two release runs back from MLflow (MLFLOW_TRACKING_URI, default the state dir's "
        "store) and print the params that differ and every metric with B - A and B / A.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("run_a", metavar="RUN_A", help="MLflow run id or quant-release run id")
    compare.add_argument("run_b", metavar="RUN_B", help="MLflow run id or quant-release run id")
    compare.add_argument("--state-dir", type=Path, metavar="DIR", help="where the local MLflow store is")
    deploy = commands.add_parser(
        "deploy",
        help="register the Prefect deployments (prefect deploy) with unknown parameters refused",
        description="Run `prefect deploy --prefect-file infra/prefect.yaml --all` (arguments after -- are "
        "added; --prefect-file or --name given there replace the defaults), then set additionalProperties: "
        "false on each deployment's parameter schema, which "
        "`prefect deploy` leaves out: the server then refuses a run with an unknown top-level parameter. "
        "Run it from the checkout the worker uses, with PREFECT_API_URL set.",
    )
    deploy.add_argument(
        "prefect_args", nargs=argparse.REMAINDER, metavar="-- PREFECT_DEPLOY_ARGS", help="passed to prefect deploy"
    )
    _stack_parser(commands)
    return parser


STACK_HELP = """services (all on 127.0.0.1, detached: they keep running after the command returns):
  seaweedfs   S3, port --s3-port (default 8333), bucket --bucket with a key pair generated on the first up
  mlflow      MLflow server, port --mlflow-port (default 5000), sqlite in DIR, artifacts in s3://BUCKET/mlflow
  prefect     Prefect server and UI, port --prefect-port (default 4200), its database in DIR

state directory (--dir, env QUANT_RELEASE_STACK_DIR, default $XDG_STATE_HOME/quant-release/stack,
  i.e. ~/.local/state/quant-release/stack): data, <service>.log, <service>.pid, s3-credentials.json (0600)

exit codes: 0 success (status: all healthy), 1 a service did not start or is not healthy, 2 bad input
  (a port in use, an unwritable directory)
"""


def _stack_parser(commands: Any) -> None:
    from quant_release import stack

    parser = commands.add_parser(
        "stack",
        help="start, stop or check a local Prefect + MLflow + S3 stack to try the full system",
        description="A Prefect server, an MLflow server (sqlite, artifacts on S3) and SeaweedFS (S3) on "
        "127.0.0.1, with their data in one directory. `up` prints the environment a run needs.",
        epilog=STACK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="stack_command", metavar="ACTION", required=True)
    directory = argparse.ArgumentParser(add_help=False)
    directory.add_argument(
        "--dir",
        type=_nonempty_path,
        default=None,
        metavar="DIR",
        help=f"state directory (env QUANT_RELEASE_STACK_DIR; default {stack.default_dir()})",
    )
    up = actions.add_parser(
        "up",
        parents=[directory],
        help="start the servers (or find them running), wait until each answers, print the exports",
        description="Start SeaweedFS, MLflow and Prefect detached, wait for their health checks, then print "
        "their URLs and the export lines for a run. Already running: says so and prints them again.",
        epilog=STACK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument(
        "--s3-port", type=int, default=stack.DEFAULT_S3_PORT, metavar="PORT", help="S3 (default %(default)s)"
    )
    up.add_argument(
        "--mlflow-port",
        type=int,
        default=stack.DEFAULT_MLFLOW_PORT,
        metavar="PORT",
        help="MLflow (default %(default)s)",
    )
    up.add_argument(
        "--prefect-port",
        type=int,
        default=stack.DEFAULT_PREFECT_PORT,
        metavar="PORT",
        help="Prefect API and UI (default %(default)s)",
    )
    up.add_argument("--bucket", default=stack.DEFAULT_BUCKET, help="S3 bucket for artifacts (default %(default)s)")
    up.add_argument(
        "--timeout",
        type=float,
        default=stack.DEFAULT_START_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the health checks (default %(default)s)",
    )
    down = actions.add_parser(
        "down",
        parents=[directory],
        help="stop the servers (SIGTERM, SIGKILL after --timeout); data is kept unless --purge",
        description="Stop each server's process group: SIGTERM, then SIGKILL after --timeout seconds.",
        epilog=STACK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    down.add_argument(
        "--timeout",
        type=float,
        default=stack.DEFAULT_STOP_TIMEOUT,
        metavar="SECONDS",
        help="seconds between SIGTERM and SIGKILL (default %(default)s)",
    )
    down.add_argument("--purge", action="store_true", help="also delete the data, logs and S3 credentials of the stack")
    actions.add_parser(
        "status",
        parents=[directory],
        help="each server's pid, URL and health; exit 0 only when all are healthy",
        epilog=STACK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions.add_parser(
        "env",
        parents=[directory],
        help='print the export lines of a running stack again (eval "$(quant-release stack env)")',
        epilog=STACK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def config_from_args(args: argparse.Namespace) -> ReleaseConfig:
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith("opt__"):
            continue
        target = overrides
        *parents, leaf = key.removeprefix("opt__").split("__")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    file_data = load_config_file(args.config) if args.config else None
    origin = f"options (config file {args.config} and flags)" if args.config else "options"
    return build_config(file_data, overrides, origin=origin)


def _prepare_environment(args: argparse.Namespace) -> None:
    if args.state_dir:
        os.environ["QUANT_RELEASE_STATE_DIR"] = str(args.state_dir)
    if args.quiet:
        os.environ["QUANT_RELEASE_PROGRESS"] = "false"
    # Prefect settings are read when prefect is first imported, which happens after this.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The per-run server gets 20 s to start by default: too little on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not args.verbose:
        # CRITICAL: Prefect logs a failed flow's traceback at ERROR; the CLI prints the one-line cause itself.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # No third-party progress bars (transformers, huggingface_hub, plain tqdm): the progress lines say
        # what matters. Set here, before those libraries are imported (only when a stage really runs).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        return _compare(args)
    if args.command == "deploy":
        return _deploy(args)
    if args.command == "stack":
        return _stack(args)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        return _fail(str(exc), exc.exit_code)
    if args.command == "plan":
        return _plan(config, args)
    if args.command == "config":
        if args.schema:
            import json

            print(json.dumps(ReleaseConfig.model_json_schema(), indent=2))
        else:
            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    if args.command in STAGES:
        config = config.model_copy(update={"stages": [args.command]})
    if args.summary_json:
        from quant_release.checks import check_writable_file

        try:
            # Written after the run: a path it cannot write must fail now, not after hours of work.
            check_writable_file(args.summary_json, "--summary-json")
        except ConfigError as exc:
            return _fail(str(exc), exc.exit_code)
    _prepare_environment(args)
    return _run(config, args)


def _plan(config: ReleaseConfig, args: argparse.Namespace) -> int:
    from flows.plan import plan_command

    try:
        text, plan = plan_command(config, args)
    except ConfigError as exc:
        return _fail(str(exc), exc.exit_code)
    print(text)
    return ConfigError.exit_code if plan.problems else 0


def _compare(args: argparse.Namespace) -> int:
    from flows.compare import compare
    from quant_release.config import Settings

    if args.state_dir:
        os.environ["QUANT_RELEASE_STATE_DIR"] = str(args.state_dir)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        print(compare(Settings().resolved_tracking_uri(), args.run_a, args.run_b))
    except QuantReleaseError as exc:
        return _fail(error_message(exc), exc.exit_code)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    extra = args.prefect_args[1:] if args.prefect_args[:1] == ["--"] else args.prefect_args
    try:
        return deploy(list(extra))
    except QuantReleaseError as exc:
        return _fail(error_message(exc), exc.exit_code)


def _stack(args: argparse.Namespace) -> int:
    from quant_release import stack

    state_dir: Path = args.dir or stack.default_dir()
    try:
        if args.stack_command == "up":
            return _stack_up(args, state_dir)
        if args.stack_command == "down":
            stopped = stack.down(state_dir, timeout=args.timeout, purge=args.purge)
            kept = "data removed" if args.purge else f"data kept in {state_dir}"
            print(f"stopped: {', '.join(stopped) or 'nothing was running'} ({kept})")
            return 0
        if args.stack_command == "status":
            return _stack_status(state_dir)
        state = stack.load(state_dir)
        if state is None:
            return _fail(f"no stack is running in {state_dir}; start one with {PROG} stack up", 1)
        print(stack.export_lines(stack.client_env(state, stack.credentials_of(state_dir))))
        return 0
    except QuantReleaseError as exc:
        return _fail(error_message(exc), exc.exit_code)


def _stack_up(args: argparse.Namespace, state_dir: Path) -> int:
    from quant_release import stack

    for flag in ("s3_port", "mlflow_port", "prefect_port"):
        if not 1 <= getattr(args, flag) <= 65535:
            return _fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: not a TCP port (1-65535)", 2)
    if args.timeout <= 0:
        return _fail(f"--timeout {args.timeout}: must be positive", 2)
    result = stack.up(
        state_dir,
        stack.Ports(s3=args.s3_port, mlflow=args.mlflow_port, prefect=args.prefect_port),
        bucket=args.bucket,
        timeout=args.timeout,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    state = result.state
    if result.already_running:
        print(f"the stack in {state_dir} is already running")
    rows = [
        ("s3", state.s3_url, f"bucket {state.bucket}"),
        ("mlflow", state.mlflow_url, "UI and tracking API"),
        ("prefect", state.prefect_url, f"UI; API {state.prefect_api_url}"),
    ]
    for (label, url, note), name in zip(rows, stack.SERVICES, strict=True):
        print(f"{label:8} {url:24} pid {state.processes[name].pid:<8} {note}")
    print(f"state and logs: {state_dir}")
    print(f'\n# paste into your shell, or: eval "$({PROG} stack env --dir {state_dir})"')
    print(stack.export_lines(stack.client_env(state, result.credentials)))
    return 0


def _stack_status(state_dir: Path) -> int:
    from quant_release import stack

    services = stack.status(state_dir)
    if not services:
        return _fail(f"no stack is running in {state_dir}", 1)
    for service in services:
        health = "healthy" if service.healthy else "running, not answering" if service.running else "stopped"
        print(f"{service.name:10} {service.url:24} pid {service.pid or '-':<8} {health}")
    return 0 if all(service.healthy for service in services) else 1


def prefect_api_url() -> str | None:
    """The Prefect server to report to, if one is configured (an empty value counts as unset)."""
    return os.environ.get("PREFECT_API_URL") or None


def _run(config: ReleaseConfig, args: argparse.Namespace) -> int:
    import logging
    import warnings

    from quant_release.config import load_settings
    from quant_release.progress import Progress

    if not args.verbose:
        warnings.filterwarnings("ignore")  # third-party deprecation chatter; progress lines say what matters
        for name in ("transformers", "mlflow", "modelopt", "DeepSpeed", "alembic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    from flows.pipeline import new_run_id, run_dir, run_release

    try:
        settings = load_settings()
    except ConfigError as exc:
        return _fail(str(exc), exc.exit_code)
    from quant_release import netlimits

    netlimits.install(settings)  # time limits and retries on every network client
    from quant_release import signals

    signals.install()  # SIGINT/SIGTERM unwind the run: MLflow runs KILLED, summary written
    run_id = new_run_id()
    code = 0
    try:
        # Libraries print to stdout (modelopt's quantizer counts, ...); stdout is for the summary table.
        with contextlib.redirect_stdout(sys.stderr):
            if prefect_api_url():
                from flows.release import release

                # A flow run on that server, a task run per stage; preflight runs first inside it.
                release.with_options(flow_run_name=run_id)(config=config)
            else:
                # No Prefect server: the flow's body as a plain function; prefect is not even imported.
                run_release(config, settings, run_id, Progress(enabled=settings.progress))
    except (signals.Interrupted, KeyboardInterrupt) as exc:
        interrupted = exc if isinstance(exc, signals.Interrupted) else signals.Interrupted(2)
        code = _fail(f"{interrupted}; MLflow runs ended as KILLED, finished stages are kept", interrupted.exit_code)
    except QuantReleaseError as exc:
        code = _fail(error_message(exc), exc.exit_code)
    except Exception as exc:  # a stage failed; the summary and MLflow hold the details
        code = _fail(error_message(exc), EXIT_STAGE_FAILED)
    summary_file = run_dir(settings, run_id) / "summary.json"
    if summary_file.is_file():
        from quant_release.atomic import write_text_atomic
        from quant_release.summary import RunSummary, summary_table

        text = summary_file.read_text()
        if args.summary_json:
            write_text_atomic(args.summary_json, text)
        print(summary_table(RunSummary.model_validate_json(text)))
    return code


if __name__ == "__main__":
    sys.exit(main())
