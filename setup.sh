#!/usr/bin/env bash
# Set up raymeta on a fresh machine: Fashion-MNIST (Debian package, where apt is available),
# a virtual environment in .venv and the package with its pinned dependencies.
set -euo pipefail
cd "$(dirname "$0")"
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && [ -z "${RAYMETA_DATA_DIR:-}" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "setup.sh: Fashion-MNIST not found. Install it with 'sudo apt-get install dataset-fashion-mnist'," >&2
    echo "          or put the four IDX .gz files in a folder and export RAYMETA_DATA_DIR=that/folder" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
