#!/usr/bin/env bash
# Installs Tandem into a virtual environment on a fresh machine (CPU only).
# Why a script: torchrec's metadata asks for the CUDA fbgemm-gpu, so it must be
# installed with --no-deps after its CPU-only needs (fbgemm-gpu-cpu matched to torch).
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -m pip install -q --no-deps "torchrec==1.8.0"
# Fail here, loudly, if the pinned trio does not load together.
"$VENV/bin/python" -c "import torch, fbgemm_gpu, torchrec, faiss; print('tandem set-up ok: torch', torch.__version__, 'torchrec', torchrec.__version__, 'faiss', faiss.__version__)"
touch "$VENV/.installed"
