"""`quant-release plan`: the memory plan of a run, printed before anything is downloaded.

The same options as `run`; `--model` may also be a bare config.json (shapes only, as the README's table
for Llama-3.1-8B/70B/405B does). The machine is this one, or the one `--gpus/--gpu-memory/--host-memory`
describe. Exit 0 when the run fits, 2 when it does not (the one-line reasons are printed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from quant_release.config import ReleaseConfig, load_settings
from quant_release.engines import resolve_engine
from quant_release.environment import resolved_device
from quant_release.errors import ConfigError
from quant_release.plan import Machine, ModelShape, Plan, PlanError, parse_bytes, plan_for_config, render
from quant_release.stages import needed_stages


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("machine", "plan for another machine than this one")
    group.add_argument("--gpus", type=int, metavar="N", help="GPUs on the target machine (0: CPU only)")
    group.add_argument("--gpu-memory", metavar="SIZE", help="memory of each GPU, e.g. 141GB (H200) or 80GB")
    group.add_argument("--host-memory", metavar="SIZE", help="host memory, e.g. 2TiB")


def _shape(config: ReleaseConfig) -> tuple[str, ModelShape]:
    model = Path(config.source.model).expanduser()
    if model.is_file() and model.suffix == ".json":
        from tasks.download import read_model_config

        try:
            return model.parent.name or model.name, ModelShape.from_hf_config(read_model_config(model, str(model)))
        except PlanError as exc:
            raise ConfigError(f"{model}: {exc}") from None
    from tasks.download import check_source

    checked = check_source(config.source, load_settings())
    if checked.shape is None:
        raise ConfigError(f"{checked.source}: its header states no shapes to plan with")
    return checked.name, checked.shape


def _machine(args: argparse.Namespace, device: str) -> Machine:
    here = Machine.detect(device)
    try:
        gpus = here.gpus if args.gpus is None else args.gpus
        gpu_bytes = parse_bytes(args.gpu_memory) if args.gpu_memory else here.gpu_bytes
        host_bytes = parse_bytes(args.host_memory) if args.host_memory else here.host_bytes
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if gpus < 0:
        raise ConfigError("--gpus must be 0 or more")
    if gpus and not gpu_bytes:
        raise ConfigError("--gpus on a machine without GPUs needs --gpu-memory")
    described = args.gpus is not None or args.gpu_memory or args.host_memory
    name = "" if described else here.name
    return Machine(gpus=gpus, gpu_bytes=gpu_bytes if gpus else 0, host_bytes=host_bytes, name=name)


def plan_command(config: ReleaseConfig, args: argparse.Namespace) -> tuple[str, Plan]:
    """The rendered plan; ConfigError for bad input."""
    name, shape = _shape(config)
    described = args.gpus is not None or bool(args.gpu_memory)
    device = ("cuda" if args.gpus else "cpu") if described else resolved_device(config.engine.device)
    engine = resolve_engine(config.engine.kind, device) if not described else config.engine.kind
    if engine == "auto":
        engine = "builtin"
    plan = plan_for_config(shape, config, _machine(args, device), needed_stages(config), engine)
    return f"plan for {name}\n" + render(plan), plan
