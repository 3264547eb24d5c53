#! /bin/bash
# Purpose: text -> video with the vision-language LWM (`python -m lwm.vision_generation`, n_frames=8). By default
#   a tiny random language model and the tiny random VQGAN (32x32 frames), so it runs offline on a laptop.
# Hardware: default, 1 CPU. For LWM-Chat weights: a GPU/TPU with room for 7B (e.g. mesh_dim='!1,1,-1,1'),
#   llama_config=7b, update_llama_config="dict(theta=50000000,max_sequence_length=32768)", vqgan_config=released.
# Expected: default run ~15 s on 2 CPU cores (mostly compiling), 8 x 65 tokens at a few hundred tokens/s, an 8-frame
#   32x32 MP4 of noise (random weights). Released VQGAN + 21.6M random model, 4 frames: see benchmarks/vision_bench.py.

export SCRIPT_DIR="$( cd -- "$( dirname -- "${BASH_SOURCE[0]}" )" &> /dev/null && pwd )"
export PROJECT_DIR="$( cd -- "$( dirname -- "$SCRIPT_DIR" )" &> /dev/null && pwd )"
cd "$PROJECT_DIR"
export PYTHONPATH="$PYTHONPATH:$PROJECT_DIR"

# Any of these may be set in the environment instead.
export llama_tokenizer_path="${llama_tokenizer_path:-}"  # tokenizer.model, a folder, or a cached hub id; '' = demo
export vqgan_checkpoint="${vqgan_checkpoint:-}"          # the released VQGAN pickle or a .msgpack; '' = random
export lwm_checkpoint="${lwm_checkpoint:-}"              # streaming params file; '' = random weights
export llama_config="${llama_config:-tiny}"              # tiny | debug | 7b | json::path
export update_llama_config="${update_llama_config:-}"    # e.g. "dict(theta=50000000,max_sequence_length=32768)"
export vqgan_config="${vqgan_config:-tiny}"              # tiny | released | json::path
export mesh_dim="${mesh_dim:-1,-1,1,1}"                  # dp, fsdp, tp, sp
export output_dir="${output_dir:-$HOME/experiment_output/lwm}"
export output_file="${output_file:-$output_dir/fireworks.mp4}"
export n_frames="${n_frames:-8}"

# Relevant params
# --temperature_*: Temperature that is applied to each of the logits
# --top_k_*: Only sample from the tokens with the top k logits
# --cfg_scale_*: Classifier-free guidance scale for each modality
# --n_frames: Number of frames to generate

if [ -z "$llama_tokenizer_path" ]; then    # a small tokenizer trained on this repository's docs (< 1 s)
    llama_tokenizer_path="$output_dir/demo_tokenizer/tokenizer.model"
    [ -f "$llama_tokenizer_path" ] || "${PYTHON:-python3}" - "$llama_tokenizer_path" <<'PY'
import glob, sys
from lwm.text.tokenizer import train_sentencepiece
texts = [p for f in sorted(glob.glob("docs/*.md")) for p in open(f).read().split("\n\n") if len(p) > 40]
train_sentencepiece(texts, sys.argv[1], vocab_size=512)
PY
fi
load_checkpoint=""
[ -n "$lwm_checkpoint" ] && load_checkpoint="params::$lwm_checkpoint"

"${PYTHON:-python3}" -u -m lwm.vision_generation \
    --prompt='Fireworks over the city' \
    --output_file="$output_file" \
    --temperature_image=1.0 \
    --temperature_video=1.0 \
    --top_k_image=8192 \
    --top_k_video=1000 \
    --cfg_scale_image=5.0 \
    --cfg_scale_video=1.0 \
    --vqgan_checkpoint="$vqgan_checkpoint" \
    --vqgan_config="$vqgan_config" \
    --n_frames="$n_frames" \
    --mesh_dim="$mesh_dim" \
    --dtype='fp32' \
    --load_llama_config="$llama_config" \
    --update_llama_config="$update_llama_config" \
    --load_checkpoint="$load_checkpoint" \
    --tokenizer="$llama_tokenizer_path" \
    "$@"
