#! /bin/bash
# Multi-needle retrieval eval of LWM-Text: 4 needles per haystack, 2 asked for, 1K..10K tokens.
# Hardware: a TPU/GPU slice for 7B; set the paths below. Results: $output_file (JSON) and its .png heatmap.
set -euo pipefail
SCRIPT_DIR="$( cd -- "$( dirname -- "${BASH_SOURCE[0]}" )" &> /dev/null && pwd )"
PROJECT_DIR="$( cd -- "$( dirname -- "$SCRIPT_DIR" )" &> /dev/null && pwd )"
cd "$PROJECT_DIR"

llama_tokenizer_path="${llama_tokenizer_path:-LargeWorldModel/LWM-Text-1M}"
lwm_text_checkpoint="${lwm_text_checkpoint:?set lwm_text_checkpoint to the params file of the model}"
haystack_file="${haystack_file:?set haystack_file}"
output_file="${output_file:-results/needle_multi.json}"

python3 -u scripts/eval_needle_multi.py \
    --mesh_dim='!1,-1,4,1' \
    --dtype='fp32' \
    --load_llama_config='7b' \
    --update_llama_config="dict(theta=10000000,max_sequence_length=131072,scan_attention=True,scan_query_chunk_size=1024,scan_key_chunk_size=1024,scan_mlp=True,scan_mlp_chunk_size=1024,scan_layers=True)" \
    --load_checkpoint="params::$lwm_text_checkpoint" \
    --tokenizer="$llama_tokenizer_path" \
    --max_tokens_per_batch=5000 \
    --output_file="$output_file" \
    --haystack_file="$haystack_file" \
    --context_lengths_min=1000 \
    --context_lengths_max=10000 \
    --n_context_length_intervals=20 \
    --n_document_depth_intervals=10 \
    --n_rounds=3 \
    --n_needles_total=4 \
    --n_needles_retrieve=2 "$@"
