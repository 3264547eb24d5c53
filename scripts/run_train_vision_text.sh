#! /bin/bash
# Purpose: train the vision-language LWM (`--modality='vision,text'`) with the original's flags; by default the
#   `tiny` preset on synthetic clips (VQ codes of a moving pattern, 2-4 frames of 16x16) captioned with text
#   from this repository's docs, so it runs offline on a laptop.
# Hardware: default, 1 CPU. For the real thing set llama_config (e.g. json::LWM-Chat-1M config), the mesh,
#   seq_length/batch_size, dataset_path (VQGAN-encoded JSON lines) and tokenizer (see docs/train.md).
# Expected: default run on 2 shared CPU cores, about 1.3-1.8K tokens/s after compilation; text_loss and
#   vision_loss both fall (by step 50: text 6.2 -> ~4.2, vision 9.1 -> ~2.2). Metrics: $output_dir/$experiment_id/metrics.jsonl.

export SCRIPT_DIR="$( cd -- "$( dirname -- "${BASH_SOURCE[0]}" )" &> /dev/null && pwd )"
export PROJECT_DIR="$( cd -- "$( dirname -- "$SCRIPT_DIR" )" &> /dev/null && pwd )"
cd "$PROJECT_DIR"
export PYTHONPATH="$PYTHONPATH:$PROJECT_DIR"
export LIBTPU_INIT_ARGS="--xla_tpu_megacore_fusion_allow_ags=false --xla_enable_async_collective_permute=true --xla_tpu_enable_ag_backward_pipelining=true --xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true --xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"

# Any of these may be set in the environment instead.
export llama_tokenizer_path="${llama_tokenizer_path:-}"   # tokenizer.model, a folder, or a cached hub id; '' = demo (demo data only)
export dataset_path="${dataset_path:-}"                   # JSON lines: "fields" and a "vision" list of VQ codes; '' = demo corpus
export output_dir="${output_dir:-$HOME/experiment_output/lwm}"
export llama_config="${llama_config:-tiny}"               # tiny | debug | 200m | 1b | 3b | 7b | 13b | 30b | 65b | json::path
export mesh_dim="${mesh_dim:-1,-1,1,1}"                   # dp, fsdp, tp, sp
export seq_length="${seq_length:-1024}"
export batch_size="${batch_size:-2}"
export total_steps="${total_steps:-200}"

export project_id='lwm'
export experiment_note=''
# The run's folder is $output_dir/$experiment_id, and --autoresume continues it. '' = example-vision-text-train
# for the demo corpus, else a name derived from the data, tokenizer, config, seq_length and batch_size: other
# data starts a new run, the same settings continue theirs.
export experiment_id="${experiment_id:-}"
key() { python3 -c 'import hashlib, sys; print(hashlib.sha1(" ".join(sys.argv[1:]).encode()).hexdigest()[:8])' "$@"; }
stem() { b="$(basename -- "$1")"; printf '%s' "${b%.*}" | tr -c 'A-Za-z0-9_.-' '-'; }

if [ -n "$dataset_path" ] && [ -z "$llama_tokenizer_path" ]; then
    echo "$(basename "$0"): dataset_path is set but llama_tokenizer_path is not: name the tokenizer of your data (a tokenizer.model, e.g. from python -m lwm.tokenizer train, or the base model's)" >&2
    exit 2
fi
tokenizer_source="llama_tokenizer_path"
if [ -z "$dataset_path" ]; then
    demo_dir="$output_dir/demo_vision_text_data"
    mkdir -p "$demo_dir"
    python3 - "$demo_dir" <<'EOF'
import glob, json, os, sys
from lwm.text.tokenizer import train_sentencepiece
out = sys.argv[1]
paragraphs = [p.strip() for f in sorted(glob.glob("docs/*.md") + ["README.md"]) for p in open(f).read().split("\n\n")]
paragraphs = [p for p in paragraphs if len(p) > 40]
if not os.path.exists(f"{out}/tokenizer.model"):
    train_sentencepiece(paragraphs, f"{out}/tokenizer.model", vocab_size=512)
import numpy as np
rng = np.random.default_rng(0)
with open(f"{out}/vision_text.jsonl", "w") as f:
    for i, p in enumerate(paragraphs):
        n_frames, shift = 2 + i % 3, int(rng.integers(0, 64))
        grid = np.add.outer(np.arange(16), np.arange(16))          # a diagonal pattern moving one step a frame
        codes = np.concatenate([(grid + shift + 3 * k) % 64 for k in range(n_frames)], axis=None)
        fields = "[caption],vision" if i % 2 else "vision,caption"
        f.write(json.dumps({"caption": p[:300], "vision": codes.tolist(), "fields": fields}) + "\n")
EOF
    dataset_path="$demo_dir/vision_text.jsonl"
    tokenizer_source="${llama_tokenizer_path:+llama_tokenizer_path}"
    llama_tokenizer_path="${llama_tokenizer_path:-$demo_dir/tokenizer.model}"
    tokenizer_source="${tokenizer_source:-the demo tokenizer, trained on the docs of this repository}"
    experiment_id="${experiment_id:-example-vision-text-train}"
fi
experiment_id="${experiment_id:-vision-text-$(stem "$dataset_path")-$(key "$(realpath -m -- "$dataset_path")" "$llama_tokenizer_path" "$llama_config" "$seq_length" "$batch_size")}"
echo "$(basename "$0"): data $dataset_path; tokenizer $llama_tokenizer_path ($tokenizer_source); run folder $output_dir/$experiment_id (continued if it exists; experiment_id=... names another)"

# mesh_dim: dp, fsdp, tp, sp
"${PYTHON:-python3}" -u -m lwm.train \
    --modality='vision,text' \
    --mesh_dim="$mesh_dim" \
    --dtype='fp32' \
    --total_steps="$total_steps" \
    --log_freq=10 \
    --save_model_freq=100 \
    --save_milestone_freq=0 \
    --load_llama_config="$llama_config" \
    --update_llama_config="dict(theta=50000000,max_sequence_length=2048,scan_attention=True,scan_query_chunk_size=512,scan_key_chunk_size=1024,scan_mlp=True,scan_mlp_chunk_size=8192,scan_layers=True)" \
    --tokenizer="$llama_tokenizer_path" \
    --optimizer.type='adamw' \
    --optimizer.accumulate_gradient_steps=1 \
    --optimizer.adamw_optimizer.weight_decay=0.1 \
    --optimizer.adamw_optimizer.lr=3e-3 \
    --optimizer.adamw_optimizer.end_lr=3e-4 \
    --optimizer.adamw_optimizer.lr_warmup_steps="$(( total_steps > 10 ? 10 : total_steps / 2 ))" \
    --optimizer.adamw_optimizer.lr_decay_steps="$total_steps" \
    --use_data_sharded_loader=True \
    --train_dataset.type='json_vision' \
    --train_dataset.vision_text_processor.fields_from_example='fields' \
    --train_dataset.vision_text_processor.max_n_frames=4 \
    --train_dataset.json_vision_dataset.mode="no_pad" \
    --train_dataset.json_vision_dataset.path="$dataset_path" \
    --train_dataset.json_vision_dataset.seq_length="$seq_length" \
    --train_dataset.json_vision_dataset.batch_size="$batch_size" \
    --train_dataset.json_vision_dataset.tokenizer_processes=1 \
    --train_dataset.json_vision_dataset.tokenizer_parallel_chunk_size=2 \
    --train_dataset.json_vision_dataset.tokenizer_parallel_batch_size=8 \
    --train_dataset.json_vision_dataset.use_data_sharded_loader=True \
    --checkpointer.save_optimizer_state=True \
    --autoresume=True \
    --logger.append_uuid=False \
    --logger.online=False \
    --logger.project_id="$project_id" \
    --logger.experiment_id="$experiment_id" \
    --logger.experiment_note="$experiment_note" \
    --logger.output_dir="$output_dir" \
    --logger.wandb_dir="$HOME/experiment_output/$project_id" \
    "$@"
status=$?
last="$(ls -d "$output_dir/$experiment_id"/step_* 2>/dev/null | sort | tail -n 1)"
if [ "$status" = 0 ] && [ -n "$last" ] && [ -f "$last/streaming_train_state" ]; then
    echo "$(basename "$0"): checkpoint: --load_checkpoint=trainstate_params::$last/streaming_train_state"
fi
exit "$status"
