"""VQGAN encode/decode throughput (frames/s) with random weights, for each batch size.

Hardware: any JAX backend. The released architecture (146M params, 256x256 -> 16x16 codes) costs a few
hundred GFLOP per frame each way: expect well under 1 frame/s on a 2-core CPU; `--preset tiny` runs in seconds.
Run: python benchmarks/vqgan_bench.py [--preset released|tiny] [--batch_sizes 1,4] [--repeats 3] [--dtype float32]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from lwm.model.vqgan import VQGAN, VQGANConfig


def _time(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds incl. compilation, median seconds of the following calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="released", help="VQGANConfig preset or json::path")
    parser.add_argument("--batch_sizes", default="1,4", help="comma-separated frame batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    args = parser.parse_args()

    config = VQGANConfig.load(args.preset)
    vqgan = VQGAN.load(None, config, dtype=getattr(jnp, args.dtype))
    n_params = sum(p.size for p in jax.tree.leaves(vqgan.params))
    side, res = config.codes_per_side, config.resolution
    print(f"# VQGAN preset={args.preset} params={n_params / 1e6:.1f}M {res}x{res} -> {side}x{side} codes, "
          f"dtype={args.dtype}, device={jax.devices()[0].device_kind} x{jax.device_count()}")
    print(f"| {'op':6} | {'batch':>5} | {'first call s':>12} | {'ms / call':>10} | {'frames/s':>9} |")
    print(f"|{'-' * 8}|{'-' * 7}|{'-' * 14}|{'-' * 12}|{'-' * 11}|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        pixels = jax.random.uniform(jax.random.key(batch), (batch, res, res, 3), minval=-1, maxval=1)
        codes = jax.random.randint(jax.random.key(batch + 1), (batch, side, side), 0, config.num_embeddings)
        for op, fn in (("encode", lambda: vqgan.encode(pixels)[1]), ("decode", lambda: vqgan.decode(codes))):
            first, step = _time(fn, args.repeats)
            print(f"| {op:6} | {batch:5d} | {first:12.2f} | {step * 1e3:10.1f} | {batch / step:9.2f} |", flush=True)


if __name__ == "__main__":
    main()
