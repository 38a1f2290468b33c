"""Each engine's options: a pydantic section of `ReleaseConfig.engine` named after the engine.

Light on purpose (pydantic only): the config, the CLI's `--help` and the Prefect form import these,
while the backends that use them (torch, tensorrt_llm, vllm) load only when their engine runs.
A backend receives its options as strings (`EngineHandle.options`, recorded with the engine) and
reads them back with `bench_report.parse_options`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineOptions(BaseModel):
    """Base of every engine's options: a section of the config, typos rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def as_handle_options(self) -> dict[str, str]:
        """The options as `EngineBackend.prepare` takes them: JSON spellings as strings, None left out."""
        strings: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            strings[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return strings


class BuiltinOptions(EngineOptions):
    """Options of the built-in PyTorch engine."""

    fp8_gemm: Literal["auto", "scaled_mm", "emulated"] = Field(
        "auto",
        description=(
            "how FP8 layers compute: scaled_mm (real FP8 tensor-core GEMM, sm_89+), emulated (FP8 "
            "weights and FP8-rounded activations, BF16 math; any device); auto: scaled_mm where supported"
        ),
        json_schema_extra={"cli": "--fp8-gemm"},
    )
    max_batch_size: int = Field(
        256,
        ge=1,
        description="sequences the static KV cache holds at once (scoring and benchmark batches)",
        json_schema_extra={"cli": "--builtin-max-batch-size"},
    )
    compile: bool = Field(
        True,
        description="torch.compile the forward passes and replay decode steps as CUDA graphs (GPU only)",
        json_schema_extra={"cli": "--builtin-compile"},
    )


class TensorrtLlmOptions(EngineOptions):
    """Options of the TensorRT-LLM backend."""

    backend: Literal["pytorch", "tensorrt"] = Field(
        "pytorch",
        description="pytorch: the LLM API of TensorRT-LLM 1.x; tensorrt: trtllm-build engines (TensorRT-LLM <= 1.2)",
        json_schema_extra={"cli": "--trtllm-backend"},
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs per model (tensor parallel)", json_schema_extra={"cli": "--trtllm-tp"}
    )
    max_batch_size: int | None = Field(
        None, ge=1, description="scheduler's batch limit", json_schema_extra={"cli": "--trtllm-max-batch-size"}
    )
    max_num_tokens: int | None = Field(
        None, ge=1, description="tokens per scheduled step", json_schema_extra={"cli": "--trtllm-max-num-tokens"}
    )
    kv_cache_free_gpu_memory_fraction: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="share of free GPU memory for the KV cache",
        json_schema_extra={"cli": "--trtllm-kv-cache-fraction"},
    )
    # Legacy engine build only: the compiled engine's limits, and whether it returns the logits of every
    # prompt and generated token. MMLU scoring and the fidelity probe need them; they cost an lm_head
    # GEMM over every prompt token, so a benchmark-only engine can turn them off.
    max_input_len: int = Field(
        4096, ge=1, description="trtllm-build --max_input_len", json_schema_extra={"cli": "--trtllm-max-input-len"}
    )
    max_seq_len: int = Field(
        8192, ge=2, description="trtllm-build --max_seq_len", json_schema_extra={"cli": "--trtllm-max-seq-len"}
    )
    gather_all_token_logits: bool = Field(
        True,
        description="trtllm-build --gather_all_token_logits (needed by MMLU scoring and the fidelity probe)",
        json_schema_extra={"cli": "--trtllm-gather-all-token-logits"},
    )


class VllmOptions(EngineOptions):
    """Options of the vLLM backend."""

    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs per model (tensor parallel)", json_schema_extra={"cli": "--vllm-tp"}
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="share of GPU memory vLLM may use",
        json_schema_extra={"cli": "--vllm-gpu-memory-utilization"},
    )
    max_model_len: int | None = Field(
        None,
        ge=2,
        description="context length (default: the model's)",
        json_schema_extra={"cli": "--vllm-max-model-len"},
    )
    enforce_eager: bool = Field(
        False, description="no CUDA graphs (slower; for debugging)", json_schema_extra={"cli": "--vllm-enforce-eager"}
    )
    # vLLM's scheduler limit; a benchmark concurrency above it queues inside vLLM.
    max_num_seqs: int | None = Field(
        None, ge=1, description="sequences scheduled at once", json_schema_extra={"cli": "--vllm-max-num-seqs"}
    )
