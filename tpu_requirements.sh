#!/usr/bin/env bash
# TPU VM install: bash tpu_requirements.sh   (run on every host of the pod, e.g. with --worker=all)
set -euo pipefail
python -m pip install --upgrade pip
python -m pip install "jax[tpu]>=0.10"
python -m pip install -e "$(dirname "$0")"
