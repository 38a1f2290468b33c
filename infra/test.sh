#!/usr/bin/env bash
# The one test command: install the test tools, lint, type-check, lint the GitHub workflows, run pytest.
#
#   infra/test.sh               everything (what CI runs through .ci/run)
#   infra/test.sh -k hub -x     extra arguments go to pytest
#
# The tests start their own servers (SeaweedFS, MLflow, Prefect, a Hub test server), all on 127.0.0.1.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

started=$SECONDS
step() {
  printf '\n==> %s  (%ds)\n' "$*" "$((SECONDS - started))"
}

step "bootstrap: infra/bootstrap.sh --test"
infra/bootstrap.sh --test

step "lint: ruff check"
.venv/bin/ruff check .

step "format: ruff format --check"
.venv/bin/ruff format --check .

step "types: mypy (strict on flows, tasks, quant_release)"
.venv/bin/mypy

step "workflows: actionlint .github/workflows"
shopt -s nullglob
workflows=(.github/workflows/*.yml .github/workflows/*.yaml)
shopt -u nullglob
if ((${#workflows[@]} == 0)); then
  echo "test: no workflow files in .github/workflows" >&2
  exit 1
fi
.venv/bin/actionlint -no-color "${workflows[@]}"
echo "actionlint: ${#workflows[@]} workflow files clean"

step "tests: pytest $*"
# No telemetry or progress bars from the servers and libraries the tests start.
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1
export MLFLOW_DISABLE_TELEMETRY=true
export HF_HUB_DISABLE_TELEMETRY=1
export TQDM_DISABLE=1
exec .venv/bin/python -m pytest "$@"
