"""The stage table and what is derived from it: names, order, needs, switches, tasks, CLI, cache keys."""

from __future__ import annotations

import ast
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.cli import build_parser
from quant_release import hashing, stages
from quant_release.config import ReleaseConfig
from quant_release.records import Record
from quant_release.stages import STAGE_TABLE, STAGES, Stage, code_version, enabled, needed_stages

ROOT = Path(__file__).resolve().parents[2]


def test_stage_name_literal_is_the_table() -> None:
    assert typing.get_args(stages.StageName) == STAGES
    assert STAGES == ("download", "quantize", "build", "evaluate", "benchmark", "publish")
    assert ReleaseConfig().stages == list(STAGES)


def test_every_stage_reads_only_earlier_stages_and_returns_its_own_record_type() -> None:
    for position, spec in enumerate(STAGE_TABLE):
        assert set(spec.needs) <= set(STAGES[:position]), spec.name
        assert issubclass(spec.record, Record)
    assert len({spec.record for spec in STAGE_TABLE}) == len(STAGE_TABLE)


def test_a_table_whose_stage_reads_a_later_one_is_refused() -> None:
    from quant_release.records import ModelSource, QuantizedCheckpoint

    bad = (
        Stage(name="download", help="", record=ModelSource, needs=("quantize",)),
        Stage(name="quantize", help="", record=QuantizedCheckpoint),
    )
    with pytest.raises(RuntimeError, match="needs quantize, which does not run before it"):
        stages._check_table(bad)


@pytest.mark.parametrize("spec", STAGE_TABLE, ids=lambda s: s.name)
def test_each_stage_has_its_task_returning_its_record(spec: Stage) -> None:
    import flows.pipeline

    task = flows.pipeline.TASKS[spec.name]
    assert task.fn.__name__ == f"{spec.name}_task"
    assert task.name == spec.name
    hints = typing.get_type_hints(task.fn)
    assert hints["return"] is spec.record
    assert list(hints) == ["ctx", "return"]


def test_no_task_module_imports_another() -> None:
    for path in sorted((ROOT / "tasks").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {name for name in imported if name == "tasks" or name.startswith("tasks.")}, path.name


def test_the_sources_of_every_stage_exist() -> None:
    for spec in STAGE_TABLE:
        version = code_version(spec, "builtin")
        assert len(version["source"]) == 64
        assert all(v != "not installed" for v in version["packages"].values()), (spec.name, version)


# --- which stages a run needs ---------------------------------------------------------------------


def _config(**values: object) -> ReleaseConfig:
    return ReleaseConfig.model_validate(values)


def test_needed_stages() -> None:
    assert needed_stages(_config()) == set(STAGES)
    assert needed_stages(_config(stages=["download"])) == {"download"}
    assert needed_stages(_config(stages=["evaluate"])) == {"download", "quantize", "build", "evaluate"}
    # A switched-off stage is neither run nor read back, even by publish.
    off = _config(stages=["publish"], mmlu={"enabled": False})
    assert needed_stages(off) == {"download", "quantize", "build", "benchmark", "publish"}
    assert needed_stages(_config(stages=["evaluate"], mmlu={"enabled": False})) == set()


def test_enabled_reads_the_switch_the_table_names() -> None:
    assert [s.switch for s in STAGE_TABLE] == [None, None, None, "mmlu.enabled", "benchmark.enabled", None]
    config = _config(benchmark={"enabled": False})
    assert [enabled(config, s) for s in STAGES] == [True, True, True, True, False, True]


def test_cli_has_one_subcommand_per_stage_with_the_tables_help() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert [name for name in commands.choices if name in STAGES] == list(STAGES)
    helps = {action.dest: action.help for action in commands._choices_actions}
    for spec in STAGE_TABLE:
        assert helps[spec.name] == spec.help


# --- the code in the cache key --------------------------------------------------------------------

SCORER = '''"""A scorer."""

def score(letters: list[str]) -> int:
    """How many are right."""
    # count the A's
    return sum(letter == "A" for letter in letters)
'''


def test_syntax_hash_ignores_comments_docstrings_and_layout() -> None:
    reference = hashing.syntax_hash(SCORER)
    commented = SCORER.replace("# count the A's", "# count the A's, which are right by construction")
    redocumented = SCORER.replace('"""How many are right."""', '"""The number of right answers."""')
    reformatted = SCORER.replace("return sum(letter", "return sum(\n        letter").replace(
        "for letter in letters)", "for letter in letters\n    )"
    )
    undocumented = SCORER.replace('"""A scorer."""\n', "").replace('    """How many are right."""\n', "")
    for variant in (commented, redocumented, reformatted, undocumented):
        assert variant != SCORER
        assert hashing.syntax_hash(variant) == reference


def test_syntax_hash_sees_any_change_to_what_the_code_does() -> None:
    reference = hashing.syntax_hash(SCORER)
    assert hashing.syntax_hash(SCORER.replace('== "A"', '== "B"')) != reference
    assert hashing.syntax_hash(SCORER.replace("sum(", "len([").replace("letters)", "letters])")) != reference
    assert hashing.syntax_hash(SCORER.replace("def score", "def count")) != reference


@pytest.fixture
def scorer_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A module `qr_test_scorer` on sys.path, for a toy stage whose result it shapes."""
    path = tmp_path / "qr_test_scorer.py"
    path.write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    hashing._source_hash.cache_clear()
    yield path
    hashing._source_hash.cache_clear()
    sys.modules.pop("qr_test_scorer", None)


def test_stage_key_changes_with_a_function_body_not_with_a_comment(scorer_module: Path) -> None:
    from quant_release.records import MmluResult
    from quant_release.state import cache_key

    spec = Stage(name="evaluate", help="", record=MmluResult, sources=("qr_test_scorer",), packages=("pydantic",))

    def key() -> str:
        hashing._source_hash.cache_clear()  # a new process would read the file afresh
        return cache_key("evaluate", {"questions": 4, "code": code_version(spec, None)})

    original = key()
    scorer_module.write_text(SCORER.replace("# count the A's", "# a new comment").replace("How many", "Count"))
    assert key() == original
    scorer_module.write_text(SCORER.replace('== "A"', '== "B"'))
    assert key() != original


def test_stage_key_changes_with_a_package_version(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = stages.stage("quantize")
    before = code_version(spec, None)
    assert set(before["packages"]) == {"torch", "transformers", "nvidia-modelopt"}
    monkeypatch.setattr(stages, "package_version", lambda name: "99.0" if name == "torch" else "1.0")
    after = code_version(spec, None)
    assert after["packages"]["torch"] == "99.0"
    assert after != before


def test_engine_stages_include_the_engines_code() -> None:
    build = stages.stage("build")
    with_engine = code_version(build, "builtin")
    without = code_version(build, None)
    assert with_engine["source"] != without["source"]
    assert "safetensors" in with_engine["packages"]
    # A stage that runs no engine does not depend on which one is configured.
    assert code_version(stages.stage("download"), "builtin") == code_version(stages.stage("download"), None)


def test_data_files_and_packages_can_be_sources(tmp_path: Path) -> None:
    template = hashing.code_fingerprint(["quant_release:templates/model_card.md.j2"])
    assert template != hashing.code_fingerprint(["quant_release.modelcard"])
    package = hashing.code_fingerprint(["quant_release.calibration"])
    assert package != hashing.code_fingerprint(["quant_release.calibration.python_docs"])
    with pytest.raises(ModuleNotFoundError):
        hashing.code_fingerprint(["quant_release.no_such_module"])
