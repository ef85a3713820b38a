#!/usr/bin/env bash
# The tests marked `vllm` (tests/test_vllm_*.py) against the real vLLM for CPU, in the second environment.
#
#   bash .ci/run_vllm_tests.sh [pytest args]       (builds or reuses the env first: .ci/vllm_env.sh)
#
# One pytest process: each test module shares one engine (module-scoped fixtures, closed at the module's end);
# the server and on-policy modules start their own processes (vllm serve, alignkit train), one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ALIGNKIT_VLLM_VENV:-.venv-vllm}"
bash .ci/vllm_env.sh "$VENV"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ALIGNKIT_REQUIRE_VLLM=1   # in this environment a missing or broken vLLM fails the tests instead of skipping them
start=$SECONDS
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m vllm --durations=15 tests/test_vllm_*.py "$@"
echo "vllm tests: $((SECONDS - start)) s"
