"""Tokens/s of the data pipelines against what one `debug`-preset training step consumes.

Purpose: show the JSON text pipeline (the original's concatenation, and packing) and the packed vision-text
pipeline keep a training step fed, with 1 and 2 tokenizer processes, on a few MB of generated local data.
Hardware: any CPU; the train step runs on the default JAX backend. Expected on 2 busy CPU cores: a few
hundred thousand tokens/s for text, millions for vision-text (few text tokens), >= 10x the debug step.
Usage: python benchmarks/data_bench.py [--mb 4] [--seq 2048] [--batch 8] [--processes 1,2] [--no_train_step]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

WORDS = ("the of and to in is was that for on as with by he at from his an were are which this be or has "
         "had not but first one their its new after who they have her she two been other when there all "
         "during into school time may years more most only over city some world would where later up such "
         "used many can state about national out known university united then made video frame model").split()


def make_data(workdir: str, mb: float, seed: int = 0) -> tuple[str, str, list[str]]:
    """Write a text JSONL and a vision-text JSONL of about `mb` MB each; return their paths and a sample."""
    rng = random.Random(seed)
    text_path, vision_path = os.path.join(workdir, "text.jsonl"), os.path.join(workdir, "vision.jsonl")
    sample = []
    with open(text_path, "w") as f:
        while f.tell() < mb * 2**20:
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400)))
            f.write(json.dumps({"question": q, "answer": a}) + "\n")
            if len(sample) < 2000:
                sample.append(q + " " + a)
    with open(vision_path, "w") as f:
        while f.tell() < mb * 2**20:
            n_frames = rng.randint(1, 6)
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            f.write(json.dumps({"caption": caption, "vision": [rng.randrange(8192) for _ in range(256 * n_frames)],
                                "fields": rng.choice(["[caption],vision", "vision,caption"])}) + "\n")
    return text_path, vision_path, sample


def run_pipeline(config: dict, tokenizer, max_batches: int) -> dict:
    """Iterate one pass over the file (or max_batches): tokens/s with and without the start-up."""
    from lwm.training.dataset import DatasetFactory

    t0 = time.perf_counter()
    ds = DatasetFactory.load_dataset(config, tokenizer)
    it = iter(ds)
    batch, metrics = next(it)
    t1 = time.perf_counter()
    n, tokens = 1, batch["input_tokens"].size
    first = tokens
    while n < max_batches and metrics["dataset_epoch"] == 0:
        batch, metrics = next(it)
        n += 1
        tokens += batch["input_tokens"].size
    t2 = time.perf_counter()
    it.close()
    return dict(batches=n, tokens=tokens, steady_tps=(tokens - first) / max(t2 - t1, 1e-9),
                total_tps=tokens / (t2 - t0), efficiency=metrics.get("dataset_packing_efficiency", 1.0))


def debug_step_tokens_per_s(seq: int, batch: int, steps: int = 3) -> float:
    """Median tokens/s of forward + backward + AdamW for the `debug` preset (chunked loss, as lwm.train)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM, output_head_kernel
    from lwm.model.loss import cross_entropy_sums

    cfg = LLaMAConfig.load("debug").replace(max_sequence_length=max(seq, 2048))
    model = LLaMAForCausalLM(cfg)
    tx = optax.adamw(1e-4)

    def step(params, opt_state, b):
        def loss_fn(p):
            hidden = model.apply({"params": p}, b["input_tokens"], return_hidden=True)
            s, _ = cross_entropy_sums(hidden, output_head_kernel(p, cfg), b["target_tokens"], b["loss_masks"],
                                      chunk_size=1024)
            return s / jnp.sum(b["loss_masks"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
    opt_state = tx.init(params)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1))
    b = dict(input_tokens=tokens[:, :-1], target_tokens=tokens[:, 1:], loss_masks=np.ones((batch, seq), np.float32))
    step = jax.jit(step, donate_argnums=(0, 1))
    params, opt_state, loss = step(params, opt_state, b)
    loss.block_until_ready()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, b)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    return batch * seq / sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=4.0, help="size of each generated JSONL file")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--processes", default="1,2")
    p.add_argument("--max_batches", type=int, default=10_000)
    p.add_argument("--tokenizer", default="", help="a tokenizer.model; default: train a small one")
    p.add_argument("--no_train_step", action="store_true")
    p.add_argument("--step_seq", type=int, default=2048, help="sequence length of the debug train step")
    args = p.parse_args()

    from lwm.text.tokenizer import load_tokenizer, train_sentencepiece

    with tempfile.TemporaryDirectory() as workdir:
        text_path, vision_path, sample = make_data(workdir, args.mb)
        tok = (load_tokenizer(args.tokenizer) if args.tokenizer
               else train_sentencepiece(sample, os.path.join(workdir, "tokenizer.model"), vocab_size=2000))
        sizes = dict(seq_length=args.seq, batch_size=args.batch, tokenizer_parallel_batch_size=64,
                     tokenizer_parallel_chunk_size=16)
        text = {"type": "json", "text_processor": {"fields": "[question],answer"}}
        vision = {"type": "json_vision", "vision_text_processor": {"fields_from_example": "fields"}}
        cases = [("json text", "no_pad", text, "json_dataset", text_path),
                 ("json text", "pack", text, "json_dataset", text_path),
                 ("json vision-text", "pack", vision, "json_vision_dataset", vision_path)]
        print(f"tokenizer: {tok}; batch {args.batch} x seq {args.seq}; files: "
              f"text {os.path.getsize(text_path) / 2**20:.1f} MB, vision {os.path.getsize(vision_path) / 2**20:.1f} MB; "
              f"{os.cpu_count()} CPUs")
        print("| pipeline | mode | processes | batches | tokens/s (steady) | tokens/s (incl. start) | filled |")
        print("|---|---|---:|---:|---:|---:|---:|")
        results = []
        for name, mode, base, section, path in cases:
            for procs in [int(x) for x in args.processes.split(",")]:
                cfg = {**base, section: {**sizes, "path": path, "mode": mode, "tokenizer_processes": procs}}
                r = run_pipeline(cfg, tok, args.max_batches)
                results.append(min(r["steady_tps"], r["total_tps"]))
                print(f"| {name} | {mode} | {procs} | {r['batches']} | {r['steady_tps']:,.0f} | "
                      f"{r['total_tps']:,.0f} | {100 * r['efficiency']:.0f}% |", flush=True)
        if not args.no_train_step:
            step_tps = debug_step_tokens_per_s(args.step_seq, 1)
            print(f"\ndebug-preset train step (batch 1 x {args.step_seq}): {step_tps:,.0f} tokens/s; slowest pipeline "
                  f"above (lower of its two figures) is {min(results) / step_tps:,.0f}x that (target >= 10x)")


if __name__ == "__main__":
    main()
