"""ReleaseConfig, its CLI flags, YAML files, the `config` command and the environment's Settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from flows.cli import build_parser, config_from_args, leaf_fields, main
from quant_release.config import (
    PublishConfig,
    ReleaseConfig,
    Settings,
    build_config,
    load_config_file,
    load_settings,
)
from quant_release.errors import ConfigError

ENV_VARS = (
    "QUANT_RELEASE_STATE_DIR",
    "QUANT_RELEASE_ARTIFACT_URI",
    "QUANT_RELEASE_MLFLOW_TRACKING_URI",
    "QUANT_RELEASE_PROGRESS",
    "QUANT_RELEASE_SYSTEM_METRICS",
    "QUANT_RELEASE_SYSTEM_METRICS_INTERVAL",
    "MLFLOW_TRACKING_URI",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_ENDPOINT",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _parse(*argv: str) -> ReleaseConfig:
    return config_from_args(build_parser().parse_args(["run", *argv]))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every leaf field of a model, found independently of flows.cli."""
    out: set[tuple[str, ...]] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out |= _leaf_paths(annotation, (*prefix, name))
        else:
            out.add((*prefix, name))
    return out


# --- defaults and flags ---------------------------------------------------------------------------


def test_defaults_validate_and_round_trip() -> None:
    config = ReleaseConfig()
    again = ReleaseConfig.model_validate(config.model_dump(mode="json"))
    assert again == config
    assert config.stages == ["download", "quantize", "build", "evaluate", "benchmark", "publish"]
    assert build_config() == config


def test_every_leaf_field_has_a_unique_cli_flag() -> None:
    rows = list(leaf_fields())
    paths = [path for path, _, _ in rows]
    flags = [flag for _, _, flag in rows]
    assert set(paths) == _leaf_paths(ReleaseConfig)
    assert len(set(flags)) == len(flags), sorted(f for f in flags if flags.count(f) > 1)
    assert all(flag.startswith("--") for flag in flags)
    # Each flag is accepted by the run command and by every stage command.
    parser = build_parser()
    run_help = parser.parse_args(["run"])  # parses without any flag
    assert run_help.command == "run"
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in ("run", "download", "quantize", "build", "evaluate", "benchmark", "publish", "config"):
        option_strings = {s for a in subparsers.choices[command]._actions for s in a.option_strings}
        assert set(flags) <= option_strings, (command, set(flags) - option_strings)


def test_flag_values_land_in_the_right_fields() -> None:
    config = _parse(
        "--model",
        "org/name",
        "--mmlu-shots",
        "3",
        "--mmlu-subjects",
        "college_physics",
        "anatomy",
        "--no-bench",
        "--push-to-hub",
        "--hub-repo-id",
        "me/x",
        "--stages",
        "download",
        "quantize",
    )
    assert config.source.model == "org/name"
    assert config.mmlu.num_fewshot == 3
    assert config.mmlu.subjects == ["college_physics", "anatomy"]
    assert config.benchmark.enabled is False
    assert config.publish.push_to_hub is True
    assert config.publish.hub_repo_id == "me/x"
    assert config.stages == ["download", "quantize"]


# --- precedence: defaults < YAML file < flags ------------------------------------------------------


def test_precedence_defaults_then_file_then_flags(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path / "release.yaml",
        "mmlu:\n  num_fewshot: 2\n  questions_per_subject: 7\nbenchmark:\n  concurrency: [3]\n",
    )
    defaults = ReleaseConfig()
    from_file = _parse("--config", str(config_file))
    assert from_file.mmlu.num_fewshot == 2
    assert from_file.mmlu.questions_per_subject == 7
    assert from_file.benchmark.concurrency == [3]
    # Untouched options keep their defaults, also inside a section the file names.
    assert from_file.mmlu.max_seq_len == defaults.mmlu.max_seq_len
    assert from_file.source == defaults.source

    both = _parse("--config", str(config_file), "--mmlu-shots", "4", "--bench-concurrency", "5", "1")
    assert both.mmlu.num_fewshot == 4  # flag beats file
    assert both.benchmark.concurrency == [1, 5]
    assert both.mmlu.questions_per_subject == 7  # file beats default where no flag is given


def test_flag_false_overrides_file_true(tmp_path: Path) -> None:
    config_file = _write(tmp_path / "c.yaml", "publish:\n  private: true\nmmlu:\n  enabled: true\n")
    config = _parse("--config", str(config_file), "--no-private", "--no-mmlu")
    assert config.publish.private is False
    assert config.mmlu.enabled is False


def test_empty_config_file_means_defaults(tmp_path: Path) -> None:
    assert _parse("--config", str(_write(tmp_path / "empty.yaml", ""))) == ReleaseConfig()


# --- bad files and values ----------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    config_file = _write(
        tmp_path / "broken.yaml",
        "source:\n  model: org/name\nmmlu:\n  num_fewshot: 3\n    subjects: x\n",
    )
    with pytest.raises(ConfigError) as info:
        _parse("--config", str(config_file))
    message = str(info.value)
    assert str(config_file) in message
    assert "line 5" in message
    assert "\n" not in message


def test_yaml_list_at_top_level_is_rejected(tmp_path: Path) -> None:
    config_file = _write(tmp_path / "list.yaml", "- source\n- mmlu\n")
    with pytest.raises(ConfigError, match="must hold a mapping") as info:
        load_config_file(config_file)
    assert str(config_file) in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        _parse("--config", str(tmp_path / "nope.yaml"))


def test_unknown_key_in_section_names_section_and_key(tmp_path: Path) -> None:
    config_file = _write(tmp_path / "typo.yaml", "mmlu:\n  num_fewshots: 3\n")
    with pytest.raises(ConfigError) as info:
        _parse("--config", str(config_file))
    assert "mmlu.num_fewshots" in str(info.value)
    assert str(config_file) in str(info.value)


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mmmlu"):
        _parse("--config", str(_write(tmp_path / "s.yaml", "mmmlu:\n  num_fewshot: 3\n")))


def test_wrong_type_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    config_file = _write(tmp_path / "type.yaml", 'mmlu: {num_fewshot: "five"}\n')
    with pytest.raises(ConfigError) as info:
        _parse("--config", str(config_file))
    assert "mmlu.num_fewshot" in str(info.value)


def test_out_of_range_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"mmlu\.num_fewshot"):
        build_config({"mmlu": {"num_fewshot": 11}})


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "/name", "org/", "org name/x", "-org/x"])
def test_invalid_hub_repo_id(repo_id: str) -> None:
    with pytest.raises(ConfigError, match=r"publish\.hub_repo_id"):
        build_config({"publish": {"hub_repo_id": repo_id}})
    with pytest.raises(ValueError, match="ORG/NAME"):
        PublishConfig(hub_repo_id=repo_id)


def test_valid_hub_repo_id() -> None:
    assert build_config({"publish": {"hub_repo_id": "my-org/Model_1.5"}}).publish.hub_repo_id == "my-org/Model_1.5"


def test_blank_model_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"source\.model"):
        build_config({"source": {"model": "   "}})


# --- the `config` command ------------------------------------------------------------------------


def test_config_command_output_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", "org/name", "--mmlu-shots", "2", "--mmlu-subjects", "anatomy", "--no-bench", "--rerun", "build"]
    assert main(["config", *args]) == 0
    printed = capsys.readouterr().out
    expected = _parse(*args)
    assert ReleaseConfig.model_validate(yaml.safe_load(printed)) == expected

    saved = _write(tmp_path / "printed.yaml", printed)
    assert main(["config", "--config", str(saved)]) == 0
    assert capsys.readouterr().out == printed
    assert _parse("--config", str(saved)) == expected


def test_config_schema_is_release_config_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == ReleaseConfig.model_json_schema()


def test_config_command_reports_bad_file_as_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file = _write(tmp_path / "typo.yaml", "source:\n  modle: x\n")
    assert main(["config", "--config", str(config_file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("quant-release: error:")
    assert "source.modle" in lines[0]


# --- Settings: endpoints and secrets from the environment ------------------------------------------


def test_settings_read_the_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("QUANT_RELEASE_STATE_DIR", str(tmp_path / "state"))
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    clean_env.setenv("HF_TOKEN", "hf_secret")
    clean_env.setenv("HF_ENDPOINT", "http://hub.example")
    clean_env.setenv("QUANT_RELEASE_ARTIFACT_URI", "s3://bucket/prefix")
    settings = Settings()
    assert settings.state_dir == tmp_path / "state"
    assert settings.mlflow_tracking_uri == "http://mlflow.example:5000"
    assert settings.resolved_tracking_uri() == "http://mlflow.example:5000"
    assert settings.hf_token == "hf_secret"
    assert settings.hf_endpoint == "http://hub.example"
    assert settings.resolved_artifact_uri() == "s3://bucket/prefix"


def test_settings_defaults_live_under_the_state_dir(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    state = tmp_path / "state"
    clean_env.setenv("QUANT_RELEASE_STATE_DIR", str(state))
    settings = Settings()
    assert settings.mlflow_tracking_uri is None
    assert settings.hf_token is None
    assert settings.resolved_tracking_uri() == f"sqlite:///{state.resolve() / 'mlflow.db'}"
    assert Path(settings.resolved_artifact_uri()) == state.resolve() / "artifacts"


def test_system_metrics_settings(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert (settings.system_metrics, settings.system_metrics_interval) == (True, 10.0)
    clean_env.setenv("QUANT_RELEASE_SYSTEM_METRICS", "false")
    clean_env.setenv("QUANT_RELEASE_SYSTEM_METRICS_INTERVAL", "1.5")
    settings = Settings()
    assert (settings.system_metrics, settings.system_metrics_interval) == (False, 1.5)
    clean_env.setenv("QUANT_RELEASE_SYSTEM_METRICS_INTERVAL", "0")
    with pytest.raises(ConfigError, match="QUANT_RELEASE_SYSTEM_METRICS_INTERVAL='0'"):
        load_settings()


def test_settings_default_state_dir(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.chdir(tmp_path)
    settings = Settings()
    assert settings.state_dir == Path(".quant-release")
    assert Path(settings.resolved_artifact_uri()) == tmp_path.resolve() / ".quant-release" / "artifacts"


def test_secrets_are_not_parameters() -> None:
    """Tokens and endpoints come from the environment only: they are not in the run's parameters."""
    schema_text = json.dumps(ReleaseConfig.model_json_schema()).lower()
    for name in ("hf_token", "tracking_uri", "artifact_uri", "state_dir"):
        assert f'"{name}"' not in schema_text


def _all_flags() -> dict[str, Any]:
    return {flag: path for path, _, flag in leaf_fields()}


def test_state_dir_flag_sets_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flows.cli import _prepare_environment

    # _prepare_environment writes os.environ directly: make monkeypatch restore every name it touches.
    for name in ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", *ENV_VARS):
        clean_env.setenv(name, "placeholder")
        clean_env.delenv(name)
    args = build_parser().parse_args(["run", "--state-dir", str(tmp_path / "s"), "-q"])
    _prepare_environment(args)
    settings = Settings()
    assert settings.state_dir == tmp_path / "s"
    assert settings.progress is False
    assert "--state-dir" not in _all_flags()  # a path is not a release parameter
