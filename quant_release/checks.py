"""Preflight checks of the run's own inputs: paths it will write, options that contradict each other or
would be ignored, and engine settings this machine cannot honour. Each raises one ConfigError (exit 2)
or EngineUnavailableError (exit 4), or returns a one-line warning, before anything is recorded.

Cheap on purpose: nothing here imports torch unless a CUDA device was resolved (then torch is loaded
anyway), and nothing creates a file or directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from quant_release import schemes
from quant_release.config import ReleaseConfig, Settings, flag_for
from quant_release.engines import unsupported_format
from quant_release.errors import ConfigError, EngineUnavailableError
from quant_release.records import CheckedSource
from quant_release.stages import enabled, stage


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def check_writable_dir(directory: Path, what: str) -> None:
    """`directory` exists and is writable, or could be created. Tried for real (a temporary directory
    made and removed in the nearest existing ancestor): permission bits say nothing for root, nor for
    read-only mounts or /proc."""
    directory = directory.expanduser()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{what} {directory} is not a directory")
    target = _nearest_existing(directory.absolute())
    if not target.is_dir():
        raise ConfigError(f"{what} {directory} cannot be created: {target} is not a directory")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".qr-probe-", dir=target))
        probe.rmdir()
    except OSError as exc:
        raise ConfigError(f"{what} {directory} is not writable: {exc.strerror or exc} in {target}") from None


def check_writable_file(path: Path, what: str) -> None:
    """A file the run will write at its end: checked now, so a finished run cannot fail on it."""
    path = path.expanduser()
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} is not writable")
    check_writable_dir(path.parent, f"{what}'s directory")


def check_state_dir(settings: Settings) -> None:
    check_writable_dir(settings.state_dir, "state dir (--state-dir / QUANT_RELEASE_STATE_DIR)")


def _explicit(config: ReleaseConfig, section: str, name: str) -> bool:
    """Whether the user set the option (in a config file or by flag), not just left its default."""
    return name in getattr(config, section).model_fields_set


def check_options(config: ReleaseConfig, checked: CheckedSource) -> list[str]:
    """Refuse options that contradict each other; return one-line warnings for those that do nothing."""
    warnings: list[str] = []
    selected = list(config.stages)
    switched_off = [name for name in selected if not enabled(config, name)]
    if selected and len(switched_off) == len(selected):
        switches = ", ".join(
            f"{name} by {flag_for(tuple(str(stage(name).switch).split('.')))}" for name in switched_off
        )
        raise ConfigError(f"nothing to run: the selected stages are switched off ({switches})")
    for name in config.rerun:
        if name not in selected:
            raise ConfigError(
                f"--rerun {name}: stage {name} is not selected (--stages {' '.join(selected)}); "
                f"add it to --stages or drop it from --rerun"
            )
        if not enabled(config, name):
            raise ConfigError(f"--rerun {name}: stage {name} is switched off")
    if checked.kind != "hub" and _explicit(config, "source", "revision"):
        raise ConfigError(
            f"--revision {config.source.revision}: only a Hub repo has revisions; --model {config.source.model} "
            f"is a {'local directory' if checked.kind == 'local' else 'GGUF file'}"
        )
    publish = config.publish
    if publish.hub_repo_id and not publish.push_to_hub and "publish" in selected:
        warnings.append(
            f"--hub-repo-id {publish.hub_repo_id} without --push-to-hub: the card names that repo, nothing is uploaded"
        )
    bench = config.benchmark
    if checked.context_length and enabled(config, "benchmark") and "benchmark" in selected:
        longest = bench.input_mean + 3 * bench.input_stdev + bench.output_mean + 3 * bench.output_stdev
        if longest > checked.context_length:
            raise ConfigError(
                f"--bench-input-len {bench.input_mean} + --bench-output-len {bench.output_mean} (plus 3 stdev) = "
                f"{longest} tokens exceeds the model's context of {checked.context_length}"
            )
    return warnings


def check_quant_scheme(config: ReleaseConfig, engine: str, engine_needed: bool, quantize_needed: bool) -> None:
    """The scheme and KV format can be run by what will run them: the chosen engine (build, evaluate,
    benchmark) and the built-in engine's loader (quantize's fidelity figures). Refused here, in one line,
    not after calibration or when the build stage loads the checkpoint."""
    quant = config.quantization
    quant_algo, kv_algo = schemes.exported_algos(quant.algorithm, quant.kv_cache_qformat)
    asked = f"{flag_for(('quantization', 'algorithm'))} {quant.algorithm}" + (
        f" with {flag_for(('quantization', 'kv_cache_qformat'))} {quant.kv_cache_qformat}"
        if kv_algo is not None
        else ""
    )
    checks = []
    if engine_needed:
        checks.append((engine, "choose another scheme or --engine"))
    if quantize_needed and quant.fidelity_tokens > 0:
        checks.append(("builtin", "quantize measures fidelity with it; --fidelity-tokens 0 skips that"))
    for kind, hint in checks:
        problem = unsupported_format(kind, quant_algo, kv_algo)
        if problem is not None:
            raise ConfigError(f"{asked} exports quant_algo {quant_algo}: {problem} ({hint})")


def check_fp8_gemm(config: ReleaseConfig, device: str) -> None:
    """`--fp8-gemm scaled_mm` needs FP8 tensor cores: say so now (exit 4), not after the build stage."""
    if config.engine.kind != "builtin" or config.engine.builtin.fp8_gemm != "scaled_mm":
        return
    if device != "cuda":
        raise EngineUnavailableError(
            f"--fp8-gemm scaled_mm needs a CUDA GPU with FP8 GEMMs (compute capability 8.9+); the device is "
            f"{device} (use --fp8-gemm emulated or auto)"
        )
    import torch

    from quant_release.engines.llama import scaled_mm_supported

    if not scaled_mm_supported(torch.device("cuda")):
        capability = ".".join(str(part) for part in torch.cuda.get_device_capability())
        raise EngineUnavailableError(
            f"--fp8-gemm scaled_mm needs compute capability 8.9+ (Ada/Hopper); this GPU has {capability} "
            "(use --fp8-gemm emulated or auto)"
        )
