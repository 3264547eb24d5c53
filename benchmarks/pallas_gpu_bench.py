"""The Pallas (Triton) flash-attention kernel on a real GPU: correctness, tuning, speed, and a model step.

Purpose: what CPU interpret-mode tests cannot show. Hardware: one NVIDIA GPU (written for an H100).
Parts (--parts, comma-separated; each prints its own table and never stops the others):
  check   the kernel (fp32 and bf16, GQA, segment ids, padding, ring offsets) against dense attention in
          float32 at 'highest' matmul precision, forward and gradients, with a negative control; the
          model ('debug' preset) with attention_impl pallas / ring_pallas (mesh 1,1,1,1) against dense.
          Exits non-zero when a check fails.
  tune    forward / backward block caps and warps at one length.
  attn    one causal attention forward and forward+backward, bf16, B=1, N=32, H=128 (LLaMA-7B heads),
          for ours (pallas), XLA's cuDNN fused attention (jax.nn.dot_product_attention), the blockwise jnp
          path and dense XLA attention, over --lengths: time, TFLOP/s (causal FLOPs), compiled temp memory.
  train   one full training step (bf16 compute, fp32 params, AdamW) of --preset through lwm.training.steps's
          train_step, for attention impls pallas and blockwise: tokens/s and MFU against the bf16 matmul
          rate measured in the same run.
Usage: python benchmarks/pallas_gpu_bench.py --parts check,attn --lengths 2048,8192,32768

--check (alone; the device check of docs/ring_attention.md, a minute on an H100): the COMPILED Pallas kernel of
this machine (GPU: pallas_gpu, Triton; TPU: pallas_tpu, Mosaic) against dense attention computed in float64,
forward and gradients (out, dq, dk, dv), causal and not, with and without segment ids, GQA and a padded length;
the kernel runs in float32 at 'highest' matmul precision. One line per case with its worst relative error
||a - b|| / ||b|| over the four outputs, plus a negative control (shuffled segment ids must miss by > 5e-2).
Exits 0 when every case is within --tol (default 2e-5), 1 when one is not, 2 when there is no GPU or TPU: then
nothing is checked, unless --interpret, which runs BOTH kernels in Pallas interpret mode on tiny shapes (a
smoke test of the checker on CPU, not a check of any compiled kernel).
  python benchmarks/pallas_gpu_bench.py --check                 # on a GPU or TPU machine
  python benchmarks/pallas_gpu_bench.py --check --interpret     # CPU: interpret mode, tiny shapes
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from lwm.attention import blockwise, dense_attention, pallas_gpu

FAILURES: list[str] = []
INTERPRET = {"interpret": False}  # --interpret: Pallas interpret mode, to smoke-test this script on CPU


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def timed(fn, *args, iters: int = 5) -> float:
    """Median seconds of fn(*args) after one warm-up call (compile)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def make_qkv(B, T, N, K, H, dtype, seed=0, n_segments=0):
    rng = np.random.default_rng(seed)
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), dtype) for s in
                   [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)])
    seg = None
    if n_segments:
        seg = jnp.asarray(np.sort(rng.integers(0, n_segments, size=(B, T)), axis=1).astype(np.int32))
    return q, k, v, do, seg


def value_and_grads(attend, q, k, v, do, seg):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg), q, k, v)
    return (out, *vjp(do.astype(out.dtype)))


def reference(q, k, v, do, seg, causal):
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    with jax.default_matmul_precision("highest"):
        return jax.jit(functools.partial(value_and_grads, functools.partial(dense_attention, causal=causal)))(
            *f32, seg)


def expect(name: str, err: float, tol: float, *, above: bool = False):
    ok = err > tol if above else err <= tol
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} ({'>' if above else '<='} {tol:g})", flush=True)
    if not ok:
        FAILURES.append(name)


def check_kernel():
    print("== check: pallas_gpu.flash_attention vs dense (float32, highest precision)", flush=True)
    cases = [  # (B, T, N, K, H, dtype, causal, segments, chunks, tol)
        (2, 1024, 4, 2, 128, jnp.float32, True, 0, 128, 2e-5),
        (2, 1024, 4, 2, 128, jnp.float32, True, 4, 128, 2e-5),
        (1, 1000, 4, 4, 64, jnp.float32, True, 3, 64, 2e-5),
        (1, 777, 2, 1, 80, jnp.float32, False, 0, 128, 2e-5),
        (1, 2048, 8, 2, 128, jnp.bfloat16, True, 0, 128, 2e-2),
        (1, 2048, 8, 8, 128, jnp.bfloat16, True, 5, 128, 2e-2),
    ]
    for B, T, N, K, H, dtype, causal, nseg, chunk, tol in cases:
        q, k, v, do, seg = make_qkv(B, T, N, K, H, dtype, n_segments=nseg)
        ref = reference(q, k, v, do, seg, causal)
        attend = functools.partial(pallas_gpu.flash_attention, causal=causal, q_chunk=chunk, k_chunk=chunk,
                                   **INTERPRET)
        tag = f"B{B} T{T} N{N} K{K} H{H} {jnp.dtype(dtype).name} causal={causal} seg={nseg}"
        # float32 at 'highest' makes the kernel's dots IEEE fp32; at the default precision they are TF32,
        # as XLA's own float32 matmuls are on this GPU, so that case gets a TF32-sized tolerance.
        settings = (("highest", tol), ("default", 2e-3)) if dtype == jnp.float32 else (("default", tol),)
        for precision, tol_p in settings:
            with jax.default_matmul_precision(precision):
                got = jax.jit(functools.partial(value_and_grads, attend))(q, k, v, do, seg)
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
                expect(f"{tag} precision={precision} {name}", rel_err(a, b), tol_p)
        if nseg:  # negative control: the same kernel given shuffled segment ids must not match
            bad = jnp.asarray(np.random.default_rng(1).permutation(np.asarray(seg), axis=1))
            wrong = jax.jit(functools.partial(attend, segment_ids=bad))(q, k, v)
            expect(f"{tag} out with shuffled segment ids (negative control)", rel_err(wrong, ref[0]), 0.05,
                   above=True)

    print("== check: block functions with ring offsets vs the jnp blockwise ones", flush=True)
    q, k, v, do, seg = make_qkv(1, 1024, 4, 2, 128, jnp.float32, seed=3, n_segments=2)
    for q_off, k_off in ((1024, 0), (0, 1024), (2048, 1024), (512, 0)):
        base = dict(q_offset=jnp.int32(q_off), k_offset=jnp.int32(k_off), causal=True)
        outs = {}
        for name, mod, chunk in (("pallas", pallas_gpu, 128), ("jnp", blockwise, 256)):
            kw = dict(base, **INTERPRET) if mod is pallas_gpu else base
            opts = dict(kw, q_chunk=chunk, k_chunk=chunk)
            with jax.default_matmul_precision("highest"):
                fwd = jax.jit(functools.partial(mod.block_forward, **opts))
                out, lse = fwd(q, k, v, seg, seg)
                o_full, lse_full = blockwise.block_forward(q, k, v, seg, seg, q_offset=0, k_offset=0, causal=True,
                                                           q_chunk=256, k_chunk=256)
                bwd = jax.jit(functools.partial(mod.block_backward, **opts))
                outs[name] = (out, lse, *bwd(q, k, v, o_full, lse_full, do, seg, seg))
        for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            a, b = outs["pallas"][i], outs["jnp"][i]
            a = jnp.where(jnp.isneginf(a), -1e4, a) if name == "lse" else a
            b = jnp.where(jnp.isneginf(b), -1e4, b) if name == "lse" else b
            if float(jnp.linalg.norm(b)) == 0.0:
                expect(f"offsets q={q_off} k={k_off} {name} (all zero)", float(jnp.abs(a).max()), 0.0)
            else:
                expect(f"offsets q={q_off} k={k_off} {name}", rel_err(a, b), 2e-5)


def check_model():
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.parallel.sharding import make_mesh

    print("== check: debug model, attention_impl pallas / ring_pallas vs dense (float32)", flush=True)
    cfg = LLaMAConfig.load("debug").replace(max_sequence_length=2048, scan_query_chunk_size=128,
                                            scan_key_chunk_size=128)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 1024)), jnp.int32)
    params = LLaMAForCausalLM(cfg.replace(attention_impl="dense")).init(jax.random.PRNGKey(0), tokens[:, :8])

    def loss_and_grad(impl):
        interpret = impl != "dense" and INTERPRET["interpret"]   # pallas_interpret applies to Pallas impls only
        model = LLaMAForCausalLM(cfg.replace(attention_impl=impl, pallas_interpret=interpret))

        def loss(p):
            logits = model.apply(p, tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.value_and_grad(loss))(params)

    with jax.set_mesh(make_mesh("1,1,1,1")):
        ref_loss, ref_grad = loss_and_grad("dense")
        for impl in ("pallas", "ring_pallas"):
            l, g = loss_and_grad(impl)
            expect(f"{impl} loss", abs(float(l) - float(ref_loss)) / abs(float(ref_loss)), 1e-5)
            expect(f"{impl} grads", rel_err(jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]),
                                            jnp.concatenate([x.ravel() for x in jax.tree.leaves(ref_grad)])), 1e-4)


# (B, T, N, K, H, causal, segments, chunk) of --check. T=1000 pads to the block; K < N is GQA.
DEVICE_CASES = [(2, 1024, 4, 2, 128, True, 0, 128), (2, 1024, 4, 2, 128, True, 4, 128),
                (1, 1000, 4, 4, 128, True, 3, 128), (1, 512, 4, 1, 128, False, 0, 128),
                (1, 512, 4, 2, 128, False, 3, 128)]
INTERPRET_CASES = [(1, 64, 2, 1, 16, True, 0, 16), (1, 64, 2, 1, 16, True, 3, 16), (1, 40, 2, 2, 16, False, 2, 16)]


def device_check(interpret: bool, tol: float) -> int:
    """--check (module docstring). Returns the exit status: 0 all within tol, 1 a case above it, 2 no GPU/TPU."""
    from lwm.attention import pallas_tpu

    backend = jax.default_backend()
    print(f"device check: jax {jax.__version__}, backend {backend!r}, devices {jax.devices()}", flush=True)
    if interpret:
        kernels, cases = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}, INTERPRET_CASES
        print("  --interpret: both kernels in Pallas INTERPRET mode on tiny shapes; no compiled kernel runs",
              flush=True)
    elif backend in ("gpu", "cuda", "rocm"):
        kernels, cases = {"pallas_gpu": pallas_gpu}, DEVICE_CASES
    elif backend == "tpu":
        kernels, cases = {"pallas_tpu": pallas_tpu}, DEVICE_CASES
    else:
        print(f"device check: NO GPU OR TPU PRESENT (backend {backend!r}): the compiled Pallas kernels cannot run "
              "here and nothing was checked. Run it on a GPU or TPU machine, or pass --interpret for an "
              "interpret-mode smoke test of this checker.", flush=True)
        return 2
    worst_all, failed = 0.0, []
    for name, kernels_mod in kernels.items():
        for B, T, N, K, H, causal, nseg, chunk in cases:
            q, k, v, do, seg = make_qkv(B, T, N, K, H, jnp.float32, n_segments=nseg)
            with jax.enable_x64(True):  # the reference in float64, from the same float32 values
                ref = jax.jit(functools.partial(value_and_grads, functools.partial(dense_attention, causal=causal)))(
                    *(jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, do)), seg)
                ref = [np.asarray(r) for r in ref]
            attend = functools.partial(kernels_mod.flash_attention, causal=causal, q_chunk=chunk, k_chunk=chunk,
                                       interpret=interpret)
            with jax.default_matmul_precision("highest"):
                got = jax.jit(functools.partial(value_and_grads, attend))(q, k, v, do, seg)
            errs = {o: rel_err(a, b) for o, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
            worst = max(errs, key=errs.get)
            ok = all(np.isfinite(e) and e <= tol for e in errs.values())
            tag = f"{name} B{B} T{T} N{N} K{K} H{H} causal={causal} segments={nseg}"
            print(f"  {'ok  ' if ok else 'FAIL'} {tag}: worst rel err {errs[worst]:.2e} ({worst}; "
                  + ", ".join(f"{o} {e:.1e}" for o, e in errs.items()) + f") tol {tol:g}", flush=True)
            worst_all = max(worst_all, errs[worst])
            if not ok:
                failed.append(tag)
            if nseg:  # negative control: shuffled segment ids must fail the same comparison
                bad = jnp.asarray(np.random.default_rng(1).permutation(np.asarray(seg), axis=1))
                with jax.default_matmul_precision("highest"):
                    wrong = jax.jit(functools.partial(attend, segment_ids=bad))(q, k, v)
                miss = rel_err(wrong, ref[0])
                print(f"  {'ok  ' if miss > 5e-2 else 'FAIL'} {tag} shuffled segment ids (negative control): "
                      f"rel err {miss:.2e} (must be > 5e-2)", flush=True)
                if not miss > 5e-2:
                    failed.append(tag + " negative control")
    print(f"device check: worst rel err {worst_all:.2e} over {len(kernels) * len(cases)} cases; "
          f"{'FAILED: ' + '; '.join(failed) if failed else 'all within ' + format(tol, 'g')}"
          f"{' (interpret mode only)' if interpret else ''}", flush=True)
    return 1 if failed else 0


def causal_flops(B, T, N, H, backward: bool) -> float:
    fwd = 4.0 * B * N * T * T * H / 2
    return fwd * 3.5 if backward else fwd  # backward: 5 matmuls to the forward's 2


def attention_fns(impl: str, chunk: int):
    if impl == "pallas":
        return functools.partial(pallas_gpu.flash_attention, causal=True, q_chunk=chunk, k_chunk=chunk)
    if impl == "cudnn":
        return lambda q, k, v, seg: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl == "blockwise":
        return functools.partial(blockwise.blockwise_attention, causal=True, q_chunk=1024, k_chunk=1024)
    if impl == "dense":
        return functools.partial(dense_attention, causal=True)
    raise ValueError(impl)


def attn_row(impl, T, B=1, N=32, K=32, H=128, chunk=128):
    q, k, v, do, _ = make_qkv(B, T, N, K, H, jnp.bfloat16)
    attend = attention_fns(impl, chunk)
    fwd = jax.jit(lambda q, k, v: attend(q, k, v, None))
    fwd_bwd = jax.jit(lambda q, k, v, do: value_and_grads(attend, q, k, v, do, None))
    mem = fwd_bwd.lower(q, k, v, do).compile().memory_analysis()
    t_f = timed(fwd, q, k, v)
    t_fb = timed(fwd_bwd, q, k, v, do)
    return dict(impl=impl, T=T, fwd_ms=t_f * 1e3, fwd_tflops=causal_flops(B, T, N, H, False) / t_f / 1e12,
                fb_ms=t_fb * 1e3, fb_tflops=causal_flops(B, T, N, H, True) / t_fb / 1e12,
                temp_gib=mem.temp_size_in_bytes / 2**30)


def part_attn(lengths, impls):
    print("== attn: causal attention, bf16, B=1, N=32, H=128; time is the median of 5 after a warm-up", flush=True)
    print("| impl | T | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | compiled temp |", flush=True)
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for T in lengths:
        for impl in impls:
            if impl == "dense" and T > 4096:  # the backward keeps several (N, T, T) float32 arrays
                print(f"| dense | {T} | - | - | - | - | scores alone {32 * T * T * 4 / 2**30:.0f} GiB: skipped |")
                continue
            try:
                r = attn_row(impl, T)
                print(f"| {impl} | {T} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['fb_ms']:.2f} | "
                      f"{r['fb_tflops']:.0f} | {r['temp_gib']:.2f} GiB |", flush=True)
            except Exception as e:  # noqa: BLE001 - a row that fails is reported, the table goes on
                print(f"| {impl} | {T} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} |", flush=True)


def part_tune(T):
    """Forward launch settings timed on the forward alone, then backward ones on forward+backward."""
    print(f"== tune: pallas at T={T}, bf16, B=1, N=32, H=128 (FWD/BWD = block, num_warps, num_stages)", flush=True)
    print("| kernel | block | warps | stages | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s |", flush=True)
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    saved = dict(pallas_gpu.FWD), dict(pallas_gpu.BWD)
    sweeps = (("FWD", ((128, 8, 3), (128, 8, 2), (128, 4, 3), (64, 4, 3), (128, 8, 4), (64, 4, 4))),
              ("BWD", ((64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 8, 3), (128, 8, 2), (32, 4, 2), (64, 4, 4))))
    for which, combos in sweeps:
        for block, warps, stages in combos:
            getattr(pallas_gpu, which).update(block=block, num_warps=warps, num_stages=stages)
            try:  # attn_row builds fresh jit closures: the settings are read at trace time
                r = attn_row("pallas", T, chunk=128)
                print(f"| {which} | {block} | {warps} | {stages} | {r['fwd_ms']:.2f} | {r['fb_ms']:.2f} | "
                      f"{r['fb_tflops']:.0f} |", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"| {which} | {block} | {warps} | {stages} | failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:150]} |", flush=True)
            getattr(pallas_gpu, which).update(saved[0] if which == "FWD" else saved[1])


def bf16_matmul_rate() -> float:
    n = 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    t = timed(jax.jit(lambda x: x @ x), a, iters=10)
    return 2 * n**3 / t


def part_train(preset, lengths, impls, remat):
    import optax

    from lwm.model.llama import LLaMAConfig
    from lwm.model.registry import build_model
    from lwm.parallel.sharding import make_mesh
    from lwm.training.steps import (
        Task,
        flops_per_token,
        init_train_state,
        train_step,
    )

    peak = bf16_matmul_rate()
    print(f"== train: {preset} preset, batch 1, bf16 compute / fp32 params, AdamW, remat_block={remat!r}; "
          f"bf16 matmul rate measured here {peak / 1e12:.0f} TFLOP/s", flush=True)
    print("| impl | T | step s | tokens/s | MFU | compiled temp | loss |", flush=True)
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    tx = optax.adamw(1e-4)
    for T in lengths:
        for impl in impls:
            try:
                cfg = LLaMAConfig.load(preset).replace(
                    attention_impl=impl, max_sequence_length=T, remat_block=remat, scan_layers=True,
                    scan_query_chunk_size=1024 if impl == "blockwise" else 128,
                    scan_key_chunk_size=1024 if impl == "blockwise" else 128)
                task = Task(model=build_model("text", cfg, jnp.bfloat16), loss_chunk_size=4096)
                with jax.set_mesh(make_mesh("1,1,1,1")):
                    state = jax.jit(functools.partial(init_train_state, task=task, tx=tx))(jax.random.PRNGKey(0))
                    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T + 1))
                    batch = dict(input_tokens=jnp.asarray(tokens[:, :-1], jnp.int32),
                                 target_tokens=jnp.asarray(tokens[:, 1:], jnp.int32),
                                 loss_masks=jnp.ones((1, T), jnp.float32),
                                 target_vision_masks=jnp.zeros((1, T), bool))
                    step = jax.jit(functools.partial(train_step, task=task, schedule=optax.constant_schedule(1e-4)),
                                   donate_argnums=(0,))
                    rng = jax.random.PRNGKey(1)
                    temp = step.lower(state, rng, batch).compile().memory_analysis().temp_size_in_bytes
                    state, rng, m = step(state, rng, batch)
                    jax.block_until_ready(m)
                    times = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        state, rng, m = step(state, rng, batch)
                        jax.block_until_ready(m)
                        times.append(time.perf_counter() - t0)
                dt = float(np.median(times))
                fpt = flops_per_token(state.params["params"], cfg, T)
                print(f"| {impl} | {T} | {dt:.3f} | {T / dt:,.0f} | {T / dt * fpt / peak:.0%} | "
                      f"{temp / 2**30:.1f} GiB | {float(m['loss']):.3f} |", flush=True)
                del state
            except Exception as e:  # noqa: BLE001
                print(f"| {impl} | {T} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200]} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="check,attn")
    p.add_argument("--lengths", default="2048,8192,32768")
    p.add_argument("--impls", default="pallas,cudnn,blockwise,dense")
    p.add_argument("--tune_length", type=int, default=8192)
    p.add_argument("--preset", default="1b")
    p.add_argument("--train_lengths", default="8192,32768")
    p.add_argument("--train_impls", default="pallas,blockwise")
    p.add_argument("--remat", default="nothing_saveable")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke test of the script)")
    p.add_argument("--check", action="store_true", help="the device check alone (module docstring); exit 0/1/2")
    p.add_argument("--tol", type=float, default=2e-5, help="--check: largest relative error allowed")
    args = p.parse_args()
    if args.check:
        return device_check(args.interpret, args.tol)
    INTERPRET["interpret"] = args.interpret
    print(f"jax {jax.__version__}; devices {jax.devices()}", flush=True)
    parts = args.parts.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    for part, run in (("check", lambda: (check_kernel(), check_model())),
                      ("tune", lambda: part_tune(args.tune_length)),
                      ("attn", lambda: part_attn(lengths, args.impls.split(","))),
                      ("train", lambda: part_train(args.preset, [int(x) for x in args.train_lengths.split(",")],
                                                   args.train_impls.split(","), args.remat))):
        if part in parts:
            try:
                run()
            except Exception:  # noqa: BLE001 - report and go on to the next part
                traceback.print_exc()
                FAILURES.append(f"part {part} raised")
    print(f"failures: {FAILURES or 'none'}", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
