#!/usr/bin/env bash
# Creates (or updates) the virtual environment in $VENV with raygrpo and its test tools.
#
# torch: an importable torch in the venv is kept as it is (CUDA or CPU). Otherwise a machine with an
# NVIDIA GPU gets pip's default (CUDA) build, and a machine without one gets a CPU build: from the
# PyTorch CPU index when it is reachable, else $TORCH_CPU_SPEC from the configured package sources.
# Every later install is constrained to the torch that is now there, so nothing swaps it out.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU_SPEC=${TORCH_CPU_SPEC:-torch==2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found, installing the default (CUDA) torch build"
    pip install torch numpy
  elif curl -sfI -m 3 "$TORCH_CPU_INDEX/" >/dev/null 2>&1; then
    echo "install: no GPU, installing $TORCH_CPU_SPEC from the PyTorch CPU index"
    pip install "$TORCH_CPU_SPEC" numpy --index-url "$TORCH_CPU_INDEX"
  else
    echo "install: no GPU, installing $TORCH_CPU_SPEC from the configured package sources"
    pip install "$TORCH_CPU_SPEC" numpy
  fi
  "$PY" -c "import torch" || { echo "install: torch did not install; install it yourself into $VENV and rerun" >&2; exit 1; }
fi

constraints="$VENV/torch-constraint.txt"
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
echo "install: keeping $(cat "$constraints"); installing raygrpo[test]"
pip install -c "$constraints" -e ".[test]"
"$PY" -c "import raygrpo, ray, diffusers, torch; print('install: ok (torch', torch.__version__, ', ray', ray.__version__, ', diffusers', diffusers.__version__ + ')')"

# The OCR reward server's engine (reward_servers/ocr_server.py, the SD3 DGPO preset's reward; about 20 s, 250 MB).
# A step of its own: where its wheels do not install, everything else still does and the OCR tests skip, saying why.
pip install -c "$constraints" -e ".[ocr]"
if "$PY" -c "import rapidocr, onnxruntime" 2>/dev/null; then
  echo "install: OCR engine ok (rapidocr on onnxruntime)"
else
  echo "install: the OCR engine (pip install -e '.[ocr]') did not install; the OCR reward server and its tests need it" >&2
fi

# Chromium for the dashboard's browser test (tests/test_dashboard.py; it skips without one). The system package:
# playwright only drives it and never downloads a browser. Best effort: no apt, no root or no network just means a skip.
if [ -z "${RAYGRPO_SKIP_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  apt_get() { env DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@" >/dev/null 2>&1; }
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "install: installing Chromium (apt) for the dashboard's browser test"
    apt_get install chromium || { apt_get update && apt_get install chromium; } \
      || echo "install: Chromium did not install; the dashboard's browser test will skip"
  else
    echo "install: no Chromium, and no apt-get as root to install it; the dashboard's browser test will skip"
  fi
fi
