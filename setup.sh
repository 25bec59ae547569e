#!/usr/bin/env bash
# Set up raymeta on a fresh machine: Fashion-MNIST (Debian package, where apt is available;
# otherwise raymeta downloads it with torchvision on first use), Chromium for the browser test of
# the MLflow UI (Debian package, where apt is available; without it that test is skipped), a
# virtual environment in .venv and the package with its pinned dependencies (and, for the
# tests, pytest, ruff and playwright).
set -euo pipefail
cd "$(dirname "$0")"
have_fmnist=no
for dir in /usr/share/datasets/fashion-mnist ${RAYMETA_DATA_DIR:+"$RAYMETA_DATA_DIR/fashion-mnist" "$RAYMETA_DATA_DIR"}; do
  for f in "$dir"/train-images-idx3-ubyte{,.gz}; do [ -f "$f" ] && have_fmnist=yes; done
done
if [ "$have_fmnist" = no ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "setup.sh: Fashion-MNIST not installed; raymeta will download it into ~/.cache/raymeta on" >&2
    echo "          first use. Or install it with 'sudo apt-get install dataset-fashion-mnist'," >&2
    echo "          or put the four IDX .gz files in DIR/fashion-mnist and export RAYMETA_DATA_DIR=DIR" >&2
  fi
fi
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } ||
    echo "setup.sh: could not install chromium; tests/test_ui_browser.py will be skipped" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
