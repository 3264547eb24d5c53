#! /bin/bash
# Purpose: train the text LWM with `python -m lwm.train` (the original's flags); by default the `tiny` preset on
#   a small corpus made from this repository's docs, so it runs offline on a laptop.
# Hardware: default, 1 CPU (a few minutes for 200 steps). For the real thing set llama_config=7b, the mesh
#   (e.g. '!1,-1,4,4' on a TPU pod), seq_length/batch_size, dataset_path and tokenizer (see docs/train.md).
# Expected: default run on 2 shared CPU cores, about 11K tokens/s after compilation (MFU ~18%); loss falls from
#   6.26 to ~4.7 by step 50. Metrics: $output_dir/$experiment_id/metrics.jsonl; checkpoints beside it.

export SCRIPT_DIR="$( cd -- "$( dirname -- "${BASH_SOURCE[0]}" )" &> /dev/null && pwd )"
export PROJECT_DIR="$( cd -- "$( dirname -- "$SCRIPT_DIR" )" &> /dev/null && pwd )"
cd "$PROJECT_DIR"
export PYTHONPATH="$PYTHONPATH:$PROJECT_DIR"
export LIBTPU_INIT_ARGS="--xla_tpu_megacore_fusion_allow_ags=false --xla_enable_async_collective_permute=true --xla_tpu_enable_ag_backward_pipelining=true --xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true --xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"

# Any of these may be set in the environment instead.
export llama_tokenizer_path="${llama_tokenizer_path:-}"   # tokenizer.model, a folder, or a cached hub id; '' = see below
export dataset_path="${dataset_path:-}"                   # JSON lines with a "text" field; '' = demo corpus
export output_dir="${output_dir:-$HOME/experiment_output/lwm}"
export llama_config="${llama_config:-tiny}"               # tiny | debug | 200m | 1b | 3b | 7b | 13b | 30b | 65b | json::path
export mesh_dim="${mesh_dim:-1,-1,1,1}"                   # dp, fsdp, tp, sp
export seq_length="${seq_length:-512}"
export batch_size="${batch_size:-4}"
export total_steps="${total_steps:-200}"
export tokenizer_vocab_size="${tokenizer_vocab_size:-4096}"  # when the tokenizer is trained from dataset_path
# The run's folder is $output_dir/$experiment_id, and --autoresume continues it. '' = example-text-train for the
# demo corpus, else a name derived from the data, tokenizer, config, seq_length and batch_size: other data
# starts a new run, the same settings continue theirs.
export experiment_id="${experiment_id:-}"

export project_id='lwm'
export experiment_note=''
key() { python3 -c 'import hashlib, sys; print(hashlib.sha1(" ".join(sys.argv[1:]).encode()).hexdigest()[:8])' "$@"; }
stem() { b="$(basename -- "$1")"; printf '%s' "${b%.*}" | tr -c 'A-Za-z0-9_.-' '-'; }

if [ -z "$dataset_path" ]; then
    demo_dir="$output_dir/demo_text_data"
    mkdir -p "$demo_dir"
    python3 - "$demo_dir" <<'EOF'
import glob, json, os, sys
from lwm.text.tokenizer import train_sentencepiece
out = sys.argv[1]
paragraphs = [p.strip() for f in sorted(glob.glob("docs/*.md") + ["README.md"]) for p in open(f).read().split("\n\n")]
paragraphs = [p for p in paragraphs if len(p) > 40]
if not os.path.exists(f"{out}/tokenizer.model"):
    train_sentencepiece(paragraphs, f"{out}/tokenizer.model", vocab_size=512)
with open(f"{out}/text.jsonl", "w") as f:
    f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
EOF
    dataset_path="$demo_dir/text.jsonl"
    tokenizer_source="${llama_tokenizer_path:+llama_tokenizer_path}"
    llama_tokenizer_path="${llama_tokenizer_path:-$demo_dir/tokenizer.model}"
    tokenizer_source="${tokenizer_source:-the demo tokenizer, trained on the docs of this repository}"
    experiment_id="${experiment_id:-example-text-train}"
elif [ -z "$llama_tokenizer_path" ]; then
    llama_tokenizer_path="$output_dir/tokenizers/$(stem "$dataset_path")-$(key "$(realpath -m -- "$dataset_path")")-$tokenizer_vocab_size/tokenizer.model"
    tokenizer_source="trained from dataset_path by python -m lwm.tokenizer, vocab $tokenizer_vocab_size; llama_tokenizer_path=... uses another, as fine-tuning LLaMA or LWM weights must"
    if [ ! -f "$llama_tokenizer_path" ]; then
        python3 -m lwm.tokenizer train --input="$dataset_path" --output="$llama_tokenizer_path" \
            --vocab_size="$tokenizer_vocab_size" || exit 2
    fi
else
    tokenizer_source="llama_tokenizer_path"
fi
experiment_id="${experiment_id:-text-$(stem "$dataset_path")-$(key "$(realpath -m -- "$dataset_path")" "$llama_tokenizer_path" "$llama_config" "$seq_length" "$batch_size")}"
echo "$(basename "$0"): data $dataset_path; tokenizer $llama_tokenizer_path ($tokenizer_source); run folder $output_dir/$experiment_id (continued if it exists; experiment_id=... names another)"

# mesh_dim: dp, fsdp, tp, sp
"${PYTHON:-python3}" -u -m lwm.train \
    --modality='text' \
    --mesh_dim="$mesh_dim" \
    --dtype='fp32' \
    --total_steps="$total_steps" \
    --log_freq=10 \
    --save_model_freq=100 \
    --save_milestone_freq=0 \
    --load_llama_config="$llama_config" \
    --update_llama_config="dict(theta=10000,max_sequence_length=2048,scan_attention=True,scan_query_chunk_size=256,scan_key_chunk_size=512,scan_mlp=True,scan_mlp_chunk_size=1024,scan_layers=True)" \
    --tokenizer="$llama_tokenizer_path" \
    --optimizer.type='adamw' \
    --optimizer.accumulate_gradient_steps=1 \
    --optimizer.adamw_optimizer.weight_decay=0.1 \
    --optimizer.adamw_optimizer.lr=3e-3 \
    --optimizer.adamw_optimizer.end_lr=3e-4 \
    --optimizer.adamw_optimizer.lr_warmup_steps="$(( total_steps > 10 ? 10 : total_steps / 2 ))" \
    --optimizer.adamw_optimizer.lr_decay_steps="$total_steps" \
    --use_data_sharded_loader=True \
    --train_dataset.type='json' \
    --train_dataset.text_processor.fields='text' \
    --train_dataset.json_dataset.path="$dataset_path" \
    --train_dataset.json_dataset.seq_length="$seq_length" \
    --train_dataset.json_dataset.batch_size="$batch_size" \
    --train_dataset.json_dataset.tokenizer_processes=1 \
    --train_dataset.json_dataset.use_data_sharded_loader=True \
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
