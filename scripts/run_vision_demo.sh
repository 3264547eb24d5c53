#! /bin/bash
# The second main job, offline on 2 CPU cores (6 min on a quiet machine, 16 on a shared one): the synthetic
# video-language world, a VQGAN trained on it, the vision-language LWM trained on its codes (masked sequence
# packing, loss weighting), then world QA, text-to-image/video scored by pixel rules and the visual needles;
# prints where the results are.
#   bash scripts/run_vision_demo.sh                          # outputs under outputs/vision_demo/
#   OUT=/tmp/vd bash scripts/run_vision_demo.sh --size=small  # a few minutes (extra flags: lwm.vision_demo)
set -euo pipefail
SCRIPT_DIR="$( cd -- "$( dirname -- "${BASH_SOURCE[0]}" )" &> /dev/null && pwd )"
PROJECT_DIR="$( cd -- "$( dirname -- "$SCRIPT_DIR" )" &> /dev/null && pwd )"
cd "$PROJECT_DIR"
OUT="${OUT:-outputs/vision_demo}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

source "$SCRIPT_DIR/install_package.sh"
install_package "jax, flax, optax, orbax.checkpoint, sentencepiece, ml_collections, matplotlib, tqdm, fsspec, av, PIL"

JAX_PLATFORMS=cpu "$PYTHON" -m lwm.vision_demo --workdir="$OUT" "$@"
echo "== wall time of the whole job: ${SECONDS} s"
