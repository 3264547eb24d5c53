"""Sample text from a converted LWM text model with PyTorch transformers (see convert_lwm_to_hf.py).
Hardware: CPU works for small models; a 7B model wants a GPU (about 15 GB in bf16) and --device cuda.
Expected output: the prompt followed by the sampled continuation, printed once to stdout.

    python scripts/sample_pyt.py --model /out/lwm-text-chat-1m-hf --chat \
        --prompt "What is the capital of France?" --max_new_tokens 64 --temperature 0
"""
from __future__ import annotations

import argparse
import os

from lwm.text.chat_template import user_turn_text  # the one chat template (plain models take the prompt as it is)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", required=True, help="a local directory written by convert_lwm_to_hf.py")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the LWM chat template")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model}: not a local directory (nothing is downloaded; convert a "
                         "checkpoint with scripts/convert_lwm_to_hf.py)")
    if args.temperature < 0 or args.max_new_tokens < 1:
        raise SystemExit("--temperature must be >= 0 and --max_new_tokens >= 1")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=args.dtype).to(args.device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    prompt = user_turn_text(args.prompt, first=True) if args.chat else args.prompt
    ids = tokenizer(prompt).input_ids
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    input_ids = torch.tensor([ids], device=args.device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 \
        else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id, **sampling)
    print(tokenizer.decode(out[0].tolist(), skip_special_tokens=True))


if __name__ == "__main__":
    main()
