#!/usr/bin/env bash
# The peers' own Python environments for benchmarks/peers.py, where their
# dependencies clash with tinyptq's:
#   aimet: AIMET-ONNX (brings PyTorch)
#   mct:   Sony's Model Compression Toolkit with the TensorFlow it supports
# onnxruntime and the TFLite converter run in tinyptq's own environment.
# Idempotent: an environment that already imports its tool is kept.
# Usage: bash benchmarks/peers_setup.sh [DIR]   (default: $TINYPTQ_PEERS_DIR or ~/.cache/tinyptq/peers)
set -euo pipefail
dir="${1:-${TINYPTQ_PEERS_DIR:-$HOME/.cache/tinyptq/peers}}"
python="${PYTHON:-python3}"
mkdir -p "$dir"
# tinyptq's own switch to Keras 2 (tf_keras) would break MCT's TensorFlow 2.15,
# which has no tf_keras: the peers' environments run without it
unset TF_USE_LEGACY_KERAS

make_env() {  # name, module to import, packages...
  local name="$1" module="$2"; shift 2
  if "$dir/$name/bin/python" -c "import $module" >/dev/null 2>&1; then
    echo "$name: ready ($dir/$name)"
    return
  fi
  echo "$name: installing $* into $dir/$name"
  "$python" -m venv "$dir/$name"
  "$dir/$name/bin/pip" install --quiet --disable-pip-version-check "$@"
  "$dir/$name/bin/python" -c "import $module"
}

make_env aimet aimet_onnx "aimet-onnx==2.42.0"
make_env mct model_compression_toolkit "model-compression-toolkit==2.6.1" "tensorflow==2.15.*"
