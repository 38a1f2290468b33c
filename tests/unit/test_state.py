"""Stage results on disk: cache keys, the write-then-rename commit, atomic text writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quant_release.atomic import write_text_atomic
from quant_release.hashing import FileDigest
from quant_release.records import ModelSource
from quant_release.state import StageStore, cache_key

INPUTS: dict[str, Any] = {
    "download": "abc123",
    "calib_samples": 64,
    "seed": 0,
    "nested": {"a": 1, "b": [1, 2, 3]},
    "path": Path("/models/x"),
}


def _record(model_dir: Path, files: list[str] | None = None) -> ModelSource:
    """A record whose promised files exist (one byte each) when `model_dir` does."""
    if model_dir.is_dir():
        for name in files or ["model.safetensors"]:
            (model_dir / name).write_bytes(b"x")
    return ModelSource(
        kind="local",
        source=str(model_dir),
        revision=None,
        model_dir=model_dir,
        name="tiny",
        architecture="LlamaForCausalLM",
        num_parameters=123,
        files=[FileDigest(path=f, size=1, sha256="0" * 64) for f in (files or ["model.safetensors"])],
        fingerprint="f" * 64,
    )


def _leftovers(root: Path) -> list[Path]:
    return [
        p for p in root.rglob("*") if p.name.startswith((".partial-", ".old-", ".qr-")) or p.name.endswith(".partial")
    ]


# --- cache_key ------------------------------------------------------------------------------------


def test_cache_key_is_stable_and_ignores_dict_order() -> None:
    reordered = dict(reversed(list(INPUTS.items())))
    reordered["nested"] = {"b": [1, 2, 3], "a": 1}
    assert cache_key("quantize", INPUTS) == cache_key("quantize", dict(INPUTS))
    assert cache_key("quantize", INPUTS) == cache_key("quantize", reordered)
    key = cache_key("quantize", INPUTS)
    assert len(key) == 20
    assert all(c in "0123456789abcdef" for c in key)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("download", "abc124"),
        ("calib_samples", 65),
        ("seed", 1),
        ("nested", {"a": 1, "b": [1, 2, 4]}),
        ("nested", {"a": 1, "b": [3, 2, 1]}),
        ("path", Path("/models/y")),
        ("extra", None),
    ],
)
def test_cache_key_changes_with_any_value(name: str, value: Any) -> None:
    changed = {**INPUTS, name: value}
    assert cache_key("quantize", changed) != cache_key("quantize", INPUTS)


def test_cache_key_includes_the_stage_name() -> None:
    assert cache_key("evaluate", INPUTS) != cache_key("benchmark", INPUTS)


def test_cache_key_distinguishes_types() -> None:
    assert cache_key("build", {"n": 1}) != cache_key("build", {"n": "1"})


def test_cache_key_rejects_unkeyable_values() -> None:
    with pytest.raises(TypeError, match="cannot key on"):
        cache_key("build", {"x": object()})


# --- StageStore -----------------------------------------------------------------------------------


def test_commit_moves_result_into_place_and_rewrites_paths(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    with store.writing("download", "k1") as work:
        (work / "model").mkdir()
        (work / "model" / "weights.bin").write_text("w")
        record = store.commit("download", "k1", work, _record(work / "model"))
        work_seen = work
    final = store.result_dir("download", "k1")
    assert final == (tmp_path / "state").resolve() / "stages" / "download" / "k1"
    assert record.model_dir == final / "model"
    assert record.source == str(final / "model")  # every string holding the work path is rewritten
    assert (final / "model" / "weights.bin").read_text() == "w"
    assert not work_seen.exists()
    assert _leftovers(tmp_path) == []
    # record.json holds the final paths, and loads back equal.
    assert str(work_seen) not in (final / "record.json").read_text()
    assert store.load("download", "k1", ModelSource) == record


def test_paths_outside_the_work_dir_are_kept(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    elsewhere = tmp_path / "models" / "local"
    with store.writing("download", "k") as work:
        record = store.commit("download", "k", work, _record(elsewhere))
    assert record.model_dir == elsewhere


def test_failing_body_leaves_nothing(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    with pytest.raises(RuntimeError, match="boom"), store.writing("quantize", "k2") as work:
        (work / "half.safetensors").write_bytes(b"\0" * 100)
        raise RuntimeError("boom")
    assert not store.result_dir("quantize", "k2").exists()
    assert _leftovers(tmp_path) == []
    assert store.load("quantize", "k2", ModelSource) is None


def test_commit_over_existing_result_replaces_it(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    with store.writing("download", "k") as work:
        (work / "old.txt").write_text("old")
        store.commit("download", "k", work, _record(work, ["old.txt"]))
    with store.writing("download", "k") as work:
        (work / "new.txt").write_text("new")
        record = store.commit("download", "k", work, _record(work, ["new.txt"]))
    final = store.result_dir("download", "k")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt", "record.json"]
    assert record.model_dir == final
    loaded = store.load("download", "k", ModelSource)
    assert loaded is not None
    assert [f.path for f in loaded.files] == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_failed_rerun_keeps_the_previous_result(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    with store.writing("download", "k") as work:
        first = store.commit("download", "k", work, _record(work))
    with pytest.raises(RuntimeError), store.writing("download", "k"):
        raise RuntimeError("crash in the re-run")
    assert store.load("download", "k", ModelSource) == first
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("content", ["{not json", '{"kind": "local"}', "", '{"kind": "gguf", "extra": 1}'])
def test_corrupted_record_is_treated_as_absent(tmp_path: Path, content: str) -> None:
    store = StageStore(tmp_path / "state")
    with store.writing("download", "k") as work:
        store.commit("download", "k", work, _record(work))
    (store.result_dir("download", "k") / "record.json").write_text(content)
    assert store.load("download", "k", ModelSource) is None


def test_undecodable_record_is_treated_as_absent(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    directory = store.result_dir("download", "k")
    directory.mkdir(parents=True)
    (directory / "record.json").write_bytes(b"\xff\xfe\x00garbage")
    assert store.load("download", "k", ModelSource) is None


def test_result_whose_output_was_deleted_is_absent(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    with store.writing("download", "k") as work:
        store.commit("download", "k", work, _record(work))
    assert store.load("download", "k", ModelSource) is not None
    (store.result_dir("download", "k") / "model.safetensors").unlink()
    assert store.load("download", "k", ModelSource) is None


def test_result_whose_output_changed_size_is_absent(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    with store.writing("download", "k") as work:
        store.commit("download", "k", work, _record(work))
    (store.result_dir("download", "k") / "model.safetensors").write_bytes(b"truncated?")
    assert store.load("download", "k", ModelSource) is None


def test_missing_result_is_none(tmp_path: Path) -> None:
    assert StageStore(tmp_path).load("build", "nothing", ModelSource) is None


def test_result_without_record_is_absent(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    store.result_dir("build", "k").mkdir(parents=True)
    assert store.load("build", "k", ModelSource) is None


# --- write_text_atomic ----------------------------------------------------------------------------


def test_write_text_atomic_writes_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "dir" / "summary.json"
    write_text_atomic(target, "first")
    assert target.read_text() == "first"
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_write_text_atomic_failure_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old complete content")
    real_write_text = Path.write_text

    def half_then_fail(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "new content that never fully lands")
    monkeypatch.undo()
    assert target.read_text() == "old complete content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_write_text_atomic_failure_creates_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "fresh.json"
    real_write_text = Path.write_text

    def half_then_fail(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        real_write_text(self, data[:3], *args, **kwargs)
        raise OSError(5, "I/O error")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError):
        write_text_atomic(target, "complete")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
