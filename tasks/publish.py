"""publish: a Hub-ready folder (FP8 checkpoint + tokenizer + model card), stored and optionally pushed.

The folder goes to the artifact store (local dir or S3) under releases/<key>/ with a sha256 manifest,
and with `--push-to-hub` to HF_ENDPOINT as one commit. Token, repo id and write access are checked in
`check_publish`, before the run spends anything, not after an hour of calibration.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from quant_release import modelcard, quality_gate
from quant_release.config import PublishConfig, Settings
from quant_release.errors import ConfigError
from quant_release.hashing import digest_dir
from quant_release.modelcard import CardInputs
from quant_release.progress import Progress
from quant_release.records import MmluResult, QuantizedCheckpoint, Release
from quant_release.stage import RunContext, StageWork, stage_task
from quant_release.storage import ArtifactStore


def check_publish(config: PublishConfig, settings: Settings) -> None:
    """Fail fast on a push that cannot succeed: no repo id, no token, a bad token, no write access."""
    if not config.push_to_hub:
        return
    if not config.hub_repo_id:
        raise ConfigError("--push-to-hub needs --hub-repo-id ORG/NAME")
    if not settings.hf_token:
        raise ConfigError("--push-to-hub needs a Hub token in HF_TOKEN")
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        who = HfApi(endpoint=settings.hf_endpoint).whoami(token=settings.hf_token)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise ConfigError(f"HF_TOKEN was rejected by {settings.hf_endpoint} (HTTP {status})") from None
    except (OSError, httpx.TransportError) as exc:  # huggingface_hub 1.x raises httpx errors
        raise ConfigError(f"cannot reach {settings.hf_endpoint} to check HF_TOKEN: {exc}") from None
    namespace = config.hub_repo_id.split("/")[0]
    allowed = {who.get("name")} | {org.get("name") for org in who.get("orgs", [])}
    if namespace not in allowed:
        raise ConfigError(f"HF_TOKEN belongs to {who.get('name')!r}, which cannot write to namespace {namespace!r}")


def cache_inputs(config: PublishConfig, settings: Settings, artifact_uri: str) -> dict[str, Any]:
    inputs: dict[str, Any] = {**config.model_dump(), "artifact_uri": artifact_uri}
    if config.push_to_hub:
        inputs["hf_endpoint"] = settings.hf_endpoint
    return inputs


def _link_or_copy(src: Path, dst: Path) -> None:
    # A copy, never a hard link: a shared inode would let a later edit of the release folder (or of the
    # cached checkpoint) silently corrupt the other one.
    shutil.copy2(src, dst)


def assemble_folder(checkpoint: QuantizedCheckpoint, card: str, folder: Path, extra: list[Path] | None = None) -> None:
    """Checkpoint files, the card, and the files the card shows (plots)."""
    folder.mkdir(parents=True)
    for item in sorted(checkpoint.checkpoint_dir.iterdir()):
        if item.is_file():
            _link_or_copy(item, folder / item.name)
    for item in extra or []:
        shutil.copy2(item, folder / item.name)
    (folder / "README.md").write_text(card)


def validate_card_on_hub(card: str, endpoint: str) -> None:
    """POST the card to the Hub's /api/validate-yaml (what ModelCard.validate does, for any endpoint)."""
    from huggingface_hub import get_session, hf_raise_for_status

    response = get_session().post(
        f"{endpoint.rstrip('/')}/api/validate-yaml",
        json={"repoType": "model", "content": card},
        headers={"Accept": "text/plain"},
    )
    if response.status_code == 400:
        raise ConfigError(f"the Hub rejected the model card's metadata: {response.text.strip()}")
    hf_raise_for_status(response)


def run_publish(
    config: PublishConfig,
    settings: Settings,
    inputs: CardInputs,
    store: ArtifactStore,
    key: str,
    out_dir: Path,
    progress: Progress,
) -> Release:
    card = modelcard.render(inputs)
    modelcard.parse_front_matter(card)  # our own YAML must parse before anyone else sees it
    if config.push_to_hub:
        # Before anything is stored: a card the Hub rejects must not leave a complete-looking release behind.
        validate_card_on_hub(card, settings.hf_endpoint)
    folder = out_dir / "release"
    plots = [inputs.throughput.plot_file] if inputs.throughput and inputs.throughput.plot_file else []
    if inputs.mmlu and inputs.mmlu.chart_file:
        plots.append(inputs.mmlu.chart_file)
    assemble_folder(inputs.checkpoint, card, folder, plots)
    files = digest_dir(folder)
    progress.note("publish", f"release folder ready: {len(files)} files")
    release_store = store.child(f"releases/{key}")
    progress.note("publish", f"storing release folder at {release_store.uri}")
    release_store.upload_dir(folder)
    release = Release(
        folder=folder,
        model_card=folder / "README.md",
        files=files,
        artifact_uri=release_store.uri,
        accuracy_gate=inputs.gate,
    )
    if not config.push_to_hub:
        return release

    from huggingface_hub import HfApi

    assert config.hub_repo_id is not None  # check_publish guarantees it
    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token)
    progress.note("publish", f"pushing to {settings.hf_endpoint}/{config.hub_repo_id}")
    api.create_repo(config.hub_repo_id, private=config.private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=config.hub_repo_id,
        folder_path=str(folder),
        commit_message=f"FP8 release from quant-release run {inputs.run_id}",
        commit_description=f"Source: {inputs.source.source} @ {inputs.source.revision}",
        # The commit is the release: files of an earlier release (old shards) must not stay beside it.
        delete_patterns=["*"],
    )
    return release.model_copy(
        update={
            "hub_repo_id": config.hub_repo_id,
            "hub_revision": commit.oid,
            "hub_url": f"{settings.hf_endpoint.rstrip('/')}/{config.hub_repo_id}",
        }
    )


@stage_task("publish")
def publish_task(ctx: RunContext) -> Release:
    config, settings, store = ctx.config.publish, ctx.settings, ctx.preflight.store
    mmlu = ctx.results.find(MmluResult)
    gate = quality_gate.gate_for(mmlu, config)
    inputs = CardInputs.from_results(
        ctx.results,
        run_id=ctx.run_id,
        versions=ctx.versions,
        repo_id=config.hub_repo_id,
        license=config.license,
        base_model=config.base_model,
        gate=gate,
    )

    def produce(work: StageWork) -> Release:
        # Inside the stage, first: a failed gate fails publish (with its figures) before anything is stored.
        quality_gate.enforce(gate, mmlu)
        if gate is not None:
            ctx.progress.note("publish", quality_gate.describe(gate, mmlu) if mmlu else gate.decision)
        return run_publish(config, settings, inputs, store, work.key, work.dir, ctx.progress)

    fidelity_gate = inputs.checkpoint.gate
    return ctx.runner.run(
        "publish",
        # The fidelity gate's verdict is on the card but not in quantize's key (it is re-checked each run).
        {
            **cache_inputs(config, settings, store.uri),
            "fidelity_gate": fidelity_gate.model_dump() if fidelity_gate else None,
        },
        produce,
    )
