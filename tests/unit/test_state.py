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


# The smallest valid safetensors file: an 8-byte header length, the header `{}`, no tensors.
EMPTY_SAFETENSORS = b"\x02" + b"\x00" * 7 + b"{}"


def _record(model_dir: Path, files: list[str] | None = None) -> ModelSource:
    """A record whose promised files exist (one byte each; a valid empty .safetensors) when `model_dir` does."""
    names = files or ["model.safetensors"]
    if model_dir.is_dir():
        for name in names:
            (model_dir / name).write_bytes(EMPTY_SAFETENSORS if name.endswith(".safetensors") else b"x")
    return ModelSource(
        kind="local",
        source=str(model_dir),
        revision=None,
        model_dir=model_dir,
        name="tiny",
        architecture="LlamaForCausalLM",
        num_parameters=123,
        files=[
            FileDigest(path=f, size=len(EMPTY_SAFETENSORS) if f.endswith(".safetensors") else 1, sha256="0" * 64)
            for f in names
        ],
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
    assert sorted(p.name for p in final.iterdir()) == ["integrity.json", "new.txt", "record.json"]
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


# --- integrity: stamps written at commit, checked on reuse (quant_release/integrity.py) -----------


def _checkpoint_result(store: StageStore, key: str = "k") -> tuple[ModelSource, Path]:
    """A committed result holding a real safetensors file with a `weight_scale` tensor, hashed by the stage."""
    import torch
    from safetensors.torch import save_file

    from quant_release.hashing import digest_dir

    with store.writing("quantize", key) as work:
        (work / "ckpt").mkdir()
        save_file(
            {"layer.weight": torch.ones(4, 4), "layer.weight_scale": torch.tensor(0.5)},
            str(work / "ckpt" / "model.safetensors"),
        )
        (work / "ckpt" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        record = ModelSource(
            kind="local",
            source="tiny",
            revision=None,
            model_dir=work / "ckpt",
            name="tiny",
            architecture="LlamaForCausalLM",
            num_parameters=17,
            files=digest_dir(work / "ckpt"),
            fingerprint="f" * 64,
        )
        committed = store.commit("quantize", key, work, record)
    return committed, committed.model_dir / "model.safetensors"


def _rename_key_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Same size, same inode: the corruption a size check cannot see."""
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    with path.open("r+b") as handle:
        handle.write(data.replace(old, new, 1))


def test_untouched_result_is_trusted_without_rehashing(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    record, _ = _checkpoint_result(store)
    assert (store.result_dir("quantize", "k") / "integrity.json").is_file()
    for _ in range(3):
        assert store.load("quantize", "k", ModelSource) == record
    assert store.rehashed == []


def test_same_size_corruption_is_not_trusted(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    _, weights = _checkpoint_result(store)
    size, inode = weights.stat().st_size, weights.stat().st_ino
    # Right after the commit, possibly within the same file system clock tick (the racy case).
    _rename_key_in_place(weights, b"weight_scale", b"weight_scalf")
    assert (weights.stat().st_size, weights.stat().st_ino) == (size, inode)
    record, why = store.load_checked("quantize", "k", ModelSource)
    assert record is None
    assert why == f"{weights} changed since the stage wrote it (sha256 differs)"
    assert store.rehashed == [weights]


def test_a_redated_but_unchanged_file_is_hashed_once_then_trusted(tmp_path: Path) -> None:
    import os

    store = StageStore(tmp_path / "state")
    record, weights = _checkpoint_result(store)
    earlier = weights.stat().st_mtime_ns - 5_000_000_000  # as `touch -d` or a `cp -p` back would
    os.utime(weights, ns=(earlier, earlier))
    assert store.load("quantize", "k", ModelSource) == record
    assert store.rehashed == [weights]
    assert store.load("quantize", "k", ModelSource) == record
    assert store.rehashed == [weights]  # the stamp was refreshed: not hashed a second time


def test_a_file_replaced_by_a_copy_with_other_content_is_not_trusted(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    _, weights = _checkpoint_result(store)
    config = weights.with_name("config.json")
    replacement = tmp_path / "other.json"
    replacement.write_text(config.read_text().replace("Llama", "Qwen2"[:5]))
    replacement.replace(config)  # a new inode, same size
    record, why = store.load_checked("quantize", "k", ModelSource)
    assert record is None
    assert why is not None and str(config) in why


def test_a_broken_safetensors_header_is_caught_even_with_its_stat_restored(tmp_path: Path) -> None:
    import os

    store = StageStore(tmp_path / "state")
    _, weights = _checkpoint_result(store)
    st = weights.stat()
    _rename_key_in_place(weights, b'"data_offsets"', b'"data_offsetz"')
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `touch -r` or a careless restore would
    record, why = store.load_checked("quantize", "k", ModelSource)
    assert record is None
    assert why == f"{weights}: safetensors header entry 'layer.weight' has no data offsets"
    assert store.rehashed == []  # caught by the header check, not by hashing


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (b"\xff" * 8, "safetensors header length"),
        (b"\x04" + b"\x00" * 7 + b"[1] ", "not a JSON object"),
        (b"\x04" + b"\x00" * 7 + b"{no ", "not valid JSON"),
        (b"\x02" + b"\x00" * 7 + b"{}" + b"\x00" * 4, "cover 0 bytes of a 4-byte data section"),
        (b"\x02\x00", "shorter than its 8-byte header length"),
    ],
)
def test_safetensors_problems_are_named(tmp_path: Path, header: bytes, problem: str) -> None:
    from quant_release.integrity import safetensors_problem

    path = tmp_path / "x.safetensors"
    path.write_bytes(header)
    found = safetensors_problem(path)
    assert found is not None and problem in found


def test_a_deleted_unlisted_output_or_stamp_file_is_not_trusted(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    _, weights = _checkpoint_result(store)
    (weights.parent / "config.json").unlink()  # not in the record's size check, but stamped
    assert store.load_checked("quantize", "k", ModelSource)[0] is None
    _checkpoint_result(store, "k2")
    (store.result_dir("quantize", "k2") / "integrity.json").write_text("{garbage")
    record, why = store.load_checked("quantize", "k2", ModelSource)
    assert record is None and why is not None and "integrity.json is unreadable" in why


def test_results_from_before_stamps_are_checked_by_size_only(tmp_path: Path) -> None:
    store = StageStore(tmp_path / "state")
    record, _ = _checkpoint_result(store)
    (store.result_dir("quantize", "k") / "integrity.json").unlink()
    assert store.load("quantize", "k", ModelSource) == record
