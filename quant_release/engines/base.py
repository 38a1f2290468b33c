"""The one small interface every inference engine implements.

An engine *backend* prepares a variant (BF16 or FP8) once, in the build stage, into an `EngineHandle`
(a directory plus options: for TensorRT-LLM that is a compiled engine, for the built-in engine the
checkpoint itself). Later stages load the handle and ask the loaded engine for: answer-choice scores
and greedy generation (MMLU), greedy next tokens (the fidelity probe) and a throughput measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from quant_release.records import EngineHandle, ThroughputMeasurement, Variant

# Called with (done, total) as work advances; drives the progress line.
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class BenchmarkRequest:
    """Prompt token ids in, exactly `output_len` tokens out (EOS ignored), as in trtllm-bench datasets."""

    prompt: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class BenchmarkWorkload:
    """The same requests for BF16 and FP8, at most `concurrency` in flight; `warmup` runs first, untimed."""

    requests: Sequence[BenchmarkRequest]
    concurrency: int
    warmup: Sequence[BenchmarkRequest] = ()


class LoadedEngine(Protocol):
    handle: EngineHandle

    @property
    def device_name(self) -> str:
        """The accelerator's marketing name (e.g. "NVIDIA H100 80GB HBM3") or the CPU's."""
        ...

    def weight_bytes(self) -> int:
        """Bytes the variant's weights occupy as loaded (tied tensors counted once)."""
        ...

    def score_choices(
        self, contexts: Sequence[str], choices: Sequence[str], on_step: StepCallback | None = None
    ) -> list[list[float]]:
        """Log-probability of each choice as the continuation of each context (one row per context).

        Contexts passed together should share a long common prefix (an MMLU subject's few-shot
        block): engines are free to compute it once.
        """
        ...

    def greedy_next_tokens(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Argmax next token at every position of each sequence (teacher forcing)."""
        ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        on_step: StepCallback | None = None,
    ) -> list[list[int]]:
        """Greedy continuations of each prompt: the new tokens only, ending before a stop token."""
        ...

    def benchmark(self, workload: BenchmarkWorkload, on_step: StepCallback | None = None) -> ThroughputMeasurement: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def close(self) -> None: ...


class EngineBackend(Protocol):
    kind: str

    def check_available(self, device: str) -> None:
        """Raise EngineUnavailableError (one clear line) if this machine cannot run the engine."""
        ...

    def prepare(
        self, variant: Variant, model_dir: Path, work_dir: Path, device: str, options: dict[str, str]
    ) -> EngineHandle:
        """Build (or validate) the engine for one variant and return how to load it again.

        Cheap for engines that run checkpoints directly; a compilation for TensorRT-LLM's legacy path.
        """
        ...

    def load(self, handle: EngineHandle) -> LoadedEngine: ...
