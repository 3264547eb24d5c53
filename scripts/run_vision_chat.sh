#! /bin/bash
# Purpose: ask the vision-language LWM about an image or a video (`python -m lwm.vision_chat`). By default a tiny
#   random language model, the tiny random VQGAN (32x32 frames) and a generated 16-frame clip, offline.
# Hardware: default, 1 CPU. For LWM-Chat weights: accelerators with room for 7B and a long context (e.g.
#   mesh_dim='!1,1,-1,1', llama_config=7b, update_llama_config="dict(theta=50000000,max_sequence_length=131072)").
# Expected: default run ~10 s on 2 CPU cores (mostly compiling); prints "Question: ... Answer: ..." where the
#   answer is random text (random weights); 8 frames x 65 vision tokens in the prompt.

export SCRIPT_DIR="$( cd -- "$( dirname -- "${BASH_SOURCE[0]}" )" &> /dev/null && pwd )"
export PROJECT_DIR="$( cd -- "$( dirname -- "$SCRIPT_DIR" )" &> /dev/null && pwd )"
cd "$PROJECT_DIR"
export PYTHONPATH="$PYTHONPATH:$PROJECT_DIR"

# Any of these may be set in the environment instead.
export llama_tokenizer_path="${llama_tokenizer_path:-}"  # tokenizer.model, a folder, or a cached hub id; '' = demo
export vqgan_checkpoint="${vqgan_checkpoint:-}"          # the released VQGAN pickle or a .msgpack; '' = random
export lwm_checkpoint="${lwm_checkpoint:-}"              # streaming params file; '' = random weights
export input_file="${input_file:-}"                      # an image (png/jpg) or a video (mp4, ...); '' = demo clip
export llama_config="${llama_config:-tiny}"              # tiny | debug | 7b | json::path
export update_llama_config="${update_llama_config:-}"    # e.g. "dict(theta=50000000,max_sequence_length=131072)"
export vqgan_config="${vqgan_config:-tiny}"              # tiny | released | json::path
export mesh_dim="${mesh_dim:-1,-1,1,1}"                  # dp, fsdp, tp, sp
export output_dir="${output_dir:-$HOME/experiment_output/lwm}"

# Relevant params
# --input_file: A given image file (png or jpg) or video file (any video format FFmpeg reads, e.g. mp4)
# --max_n_frames: Maximum number of frames to process. If the video is longer than max_n_frames frames, it
#   uniformly samples max_n_frames frames from the video

demo_dir="$output_dir/demo_vision_chat"
if [ -z "$llama_tokenizer_path" ]; then    # a small tokenizer trained on this repository's docs (< 1 s)
    llama_tokenizer_path="$output_dir/demo_tokenizer/tokenizer.model"
    [ -f "$llama_tokenizer_path" ] || "${PYTHON:-python3}" - "$llama_tokenizer_path" <<'PY'
import glob, sys
from lwm.text.tokenizer import train_sentencepiece
texts = [p for f in sorted(glob.glob("docs/*.md")) for p in open(f).read().split("\n\n") if len(p) > 40]
train_sentencepiece(texts, sys.argv[1], vocab_size=512)
PY
fi
if [ -z "$input_file" ]; then              # a 16-frame 64x48 clip of a moving colour ramp
    input_file="$demo_dir/demo_clip.mp4"
    [ -f "$input_file" ] || "${PYTHON:-python3}" - "$input_file" <<'PY'
import sys
import numpy as np
from lwm.utils.vision_io import write_video
x, y = np.meshgrid(np.arange(64), np.arange(48))
frames = [np.stack([(x * 4 + 8 * t) % 256, y * 5, np.full_like(x, 16 * t)], -1).astype(np.uint8) for t in range(16)]
write_video(sys.argv[1], np.stack(frames), fps=8)
PY
fi
load_checkpoint=""
[ -n "$lwm_checkpoint" ] && load_checkpoint="params::$lwm_checkpoint"

"${PYTHON:-python3}" -u -m lwm.vision_chat \
    --prompt="What is the video about?" \
    --input_file="$input_file" \
    --vqgan_checkpoint="$vqgan_checkpoint" \
    --vqgan_config="$vqgan_config" \
    --mesh_dim="$mesh_dim" \
    --dtype='fp32' \
    --load_llama_config="$llama_config" \
    --max_n_frames=8 \
    --update_llama_config="$update_llama_config" \
    --load_checkpoint="$load_checkpoint" \
    --tokenizer="$llama_tokenizer_path" \
    "$@"
