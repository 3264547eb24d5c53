"""Memory planner: per-device memory of training and inference for a model, sequence length and mesh, and the
longest context that fits a device. `python -m lwm.memory --help`; CPU only, instant (the XLA check compiles
the real step on simulated CPU devices: seconds to minutes).

    python -m lwm.memory --llama_config 7b --seq_len 1048576 --mesh_dim 1,1,4,64 --dtype bf16 \
        --remat_block nothing_saveable --device_memory 95GiB
    python -m lwm.memory --llama_config debug --seq_len 4096 --mesh_dim 1,1,1,2 --check_xla

Per device, with b = B / (dp * fsdp) sequences, t = T / sp tokens of each, n = b * t,
P parameters of which P_big sharded over fsdp * sp * tp (every matrix and embedding, by lwm.parallel.sharding's
table) and the norms replicated, s the bytes of the compute dtype:

  training   parameters  P_dev * 4          (parameters are float32 in training; --dtype is the compute dtype)
             optimizer   P_dev * (4 + 4)    AdamW mu and nu (mu 2 bytes with --bf16_momentum); 0 without
             gradients   P_dev * 4
             activations the largest of three phases (PHASES below) less the gradients, where
               residuals = L * n * saved_layer * s + n * TOP_LEVEL * 4, and saved_layer, what the backward
               keeps per token and layer, is read from jax's saved residuals
               (`jax.ad_checkpoint.print_saved_residuals` on lwm.training.steps.loss_fn):
                 no remat          11 D + 2 K H / tp + 6 F / tp + N / tp + 4
                 nothing_saveable  D (the layer input)
                 checkpoint_dots   the matmul outputs: 3 D + 2 K H / tp + 2 F / tp
  inference  parameters  P_dev * s
             KV cache    2 * L * b * S * K * (H * c + z) / (sp * tp)   S the cache length (prompt + new tokens),
                         c the cache dtype's bytes (--cache_dtype; the compute dtype's by default), z the
                         bytes of a quantized cache's scale per token and kv head (int8 / fp8: c = 1, z = 4
                         (float32); else 0), lwm.utils.dtypes.cache_bytes_per_row
             activations n * PREFILL_WORKING_BYTES * D (one layer at a time, no backward) + score tiles
               + the last position's logits + with fsdp * sp > 1 the embedding table all-gathered (V D s / tp)
  sp > 1     the context-parallel strategy's extra (estimate(): ring the neighbour's K/V block, all_gather the
             full K/V, ulysses its all-to-all buffers) and a balanced layout's reordering copies in prefill;
             docs/memory.md says which of them were fitted and which checked

XLA's own numbers (`--check_xla`): peak = arguments + outputs - aliased (donated) + temporaries, from
`jax.jit(step).lower(...).compile().memory_analysis()`. The CPU compiler fuses less than the TPU/GPU ones,
so activations on TPU and GPU may be smaller; that is not checked here (docs/memory.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from lwm.attention import LOAD_BALANCES, STRATEGIES as SP_STRATEGIES

REMATS = ("", "nothing_saveable", "checkpoint_dots", "everything_saveable", "checkpoint_dots_with_no_batch_dims")

# The peak of a train step is the largest of three phases (XLA's buffer assignment on CPU, tiny and debug):
#   loss      every layer's residuals + the blockwise cross-entropy's LOSS_LOGITS (chunk, V) float32 arrays
#             (logits and their gradient) + LOSS_KERNEL (D, V) float32 kernel-gradient carries + d(hidden)
#   backward  every layer's residuals + the gradients + one layer's backward temporaries, BACKWARD_WORKING
#             times its residuals (with nothing_saveable: the recomputed layer + REMAT_WORKING times it)
#   update    the gradients + UPDATE_TEMPS parameter-sized optimizer temporaries
# The working factors are calibrated on tiny and debug at 4K tokens on one device; docs/memory.md gives the
# points they were fitted on and those they were not.
LOSS_LOGITS, LOSS_KERNEL = 2.0, 2.0
BACKWARD_WORKING, REMAT_WORKING, UPDATE_TEMPS = 0.85, 0.25, 1.0
# With sp > 1 XLA's CPU schedule keeps less of the recomputed layer: REMAT_WORKING_CP times its residuals in
# place of 1 + REMAT_WORKING (fitted on tiny, ring, 8192 tokens, sp = 4; checked on the other sp rows).
REMAT_WORKING_CP = 0.93
# Prefill keeps no residuals: one layer's temporaries, PREFILL_WORKING_BYTES[s] * D bytes per token (XLA on
# CPU, float32: 7.3 D elements for tiny, 6.3 D for debug per extra token; bfloat16 needs more on CPU, which
# computes bf16 dots through float32 copies: 52 bytes per D for debug), plus PREFILL_TILES float32 attention
# score tiles of (q_chunk, k_chunk) per head (debug, chunks 512: 6 MB whatever the length).
PREFILL_WORKING_BYTES, PREFILL_TILES = {4: 28.0, 2: 52.0}, 3.0
# all_gather prefill: PREFILL_GATHERED copies of the full gathered K and V (2 B T K H / tp) live at once (fitted
# on tiny and debug, T = 8192, sp = 4: 1.35 on both).
PREFILL_GATHERED = 1.35


def kc_len(c, seq_len: int) -> int:
    return min(c.scan_key_chunk_size, seq_len)


def TOP_LEVEL(d: int, h: int) -> int:
    """Per-token float32 residuals outside the layers: embedding output, final norm, its input and
    statistics (about 6 D) and the rotary cos/sin tables (2 H)."""
    return 6 * d + 2 * h


# Memory per chip (bytes) and where the figure comes from. GPUs: the total nvidia-smi reports for the card
# (a little under the data sheet's "80GB"/"141GB"; public reports of nvidia-smi, not measured here); TPUs: the HBM per chip of the Cloud TPU system-architecture
# pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e). A JAX process on a GPU takes 75% of it unless
# XLA_PYTHON_CLIENT_MEM_FRACTION (or XLA_PYTHON_CLIENT_PREALLOCATE=false) says otherwise (docs/memory.md).
DEVICE_TABLE = {
    "h100": (81559 * 2**20, "NVIDIA H100 SXM 80GB: 81559 MiB (nvidia-smi); data sheet 80 GB HBM3"),
    "h200": (143771 * 2**20, "NVIDIA H200 SXM: 143771 MiB (nvidia-smi); data sheet 141 GB HBM3e"),
    "a100-80g": (81920 * 2**20, "NVIDIA A100 80GB: 81920 MiB (nvidia-smi); data sheet 80 GB HBM2e"),
    "a100-40g": (40960 * 2**20, "NVIDIA A100 40GB: 40960 MiB (nvidia-smi); data sheet 40 GB HBM2"),
    "tpu-v4": (32 * 2**30, "Cloud TPU v4: 32 GiB HBM2 per chip"),
    "tpu-v5e": (16 * 2**30, "Cloud TPU v5e: 16 GiB HBM2 per chip"),
    "tpu-v5p": (95 * 2**30, "Cloud TPU v5p: 95 GiB HBM2e per chip"),
    "tpu-v6e": (32 * 2**30, "Cloud TPU v6e (Trillium): 32 GiB HBM per chip"),
}
DEVICES = {name: size for name, (size, _) in DEVICE_TABLE.items()}   # name -> bytes (lwm.cli.values.parse_size)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One point to estimate. mesh: (dp, fsdp, tp, sp) sizes."""
    config: Any                              # LLaMAConfig (or VisionLLaMAConfig)
    seq_len: int
    mesh: tuple[int, int, int, int] = (1, 1, 1, 1)
    batch_size: int = 1
    dtype_bytes: int = 4
    sp_strategy: str = "ring"                # context_parallel_strategy (used when sp > 1)
    load_balance: str = "none"               # context_parallel_load_balance (used when sp > 1)
    optimizer_state: bool = True
    bf16_momentum: bool = False
    loss_chunk_size: int = 1024
    new_tokens: int = 0                      # inference: cache slots beyond the prompt
    cache_bytes: int = 0                     # inference: bytes per KV-cache element; 0 = dtype_bytes (--cache_dtype);
                                             # 1 = int8 / fp8, stored with a float32 scale per token and kv head

    def __post_init__(self):
        """Raises ValueError (one line) for a strategy, layout or mesh the real run would refuse: the checks
        are lwm.parallel.sharding.check_model_mesh's (heads over tp, Ulysses' heads over sp, batch over dp*fsdp, the
        sequence over sp or 2*sp for zigzag and the chunk sizes), run on an abstract mesh."""
        from jax.sharding import AbstractMesh

        from lwm.parallel.sharding import MESH_AXES, check_model_mesh

        if self.sp_strategy not in SP_STRATEGIES:
            raise ValueError(f"--context_parallel_strategy={self.sp_strategy!r}; choose one of {SP_STRATEGIES}")
        if self.load_balance not in LOAD_BALANCES:
            raise ValueError(f"--context_parallel_load_balance={self.load_balance!r}; choose one of {LOAD_BALANCES}")
        check_model_mesh(self.model_config, AbstractMesh(tuple(self.mesh), MESH_AXES),
                         seq_len=self.seq_len, batch_size=self.batch_size)

    @property
    def model_config(self):
        """The config the real step runs: with sp > 1 a context-parallel attention_impl ('ring' unless the
        config already has 'ring' or 'ring_pallas') and this plan's strategy and load balance."""
        c = self.config
        if self.mesh[3] == 1:
            return c
        return c.replace(attention_impl=c.attention_impl if c.context_parallel else "ring",
                         context_parallel_strategy=self.sp_strategy, context_parallel_load_balance=self.load_balance)


def parameter_counts(c) -> tuple[int, int]:
    """(sharded, replicated) parameter counts: matrices and embeddings; the norm scales."""
    d, f, h = c.hidden_size, c.intermediate_size, c.head_dim
    layer = d * c.num_attention_heads * h * 2 + 2 * d * c.kv_heads * h + 3 * d * f
    big = c.num_hidden_layers * layer + c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
    w = getattr(c, "vision_vocab_size", None)
    if w:
        big += w * d * (1 if getattr(c, "tie_vision_embeddings", False) else 2)
    return big, (2 * c.num_hidden_layers + 1) * d


def _saved_per_layer(c, remat: str, tp: int) -> float:
    """Elements per token and layer kept for the backward (see the module docstring)."""
    d, kh, f, n = c.hidden_size, c.kv_heads * c.head_dim, c.intermediate_size, c.num_attention_heads
    if remat == "nothing_saveable":
        return d
    if remat in ("checkpoint_dots", "checkpoint_dots_with_no_batch_dims"):
        return 3 * d + 2 * kh / tp + 2 * f / tp
    return 11 * d + 2 * kh / tp + 6 * f / tp + n / tp + 4


def kv_row_bytes(element_bytes: int, head_dim: int) -> int:
    """Bytes of one token's keys (or values) for one kv head: H elements, plus a float32 scale when the
    elements are 1 byte (int8 / fp8, lwm.attention.decode.quantize). Example: (2, 128) -> 256, (1, 128) -> 132."""
    from lwm.utils.dtypes import CACHE_SCALE_DTYPE

    return head_dim * element_bytes + (CACHE_SCALE_DTYPE.itemsize if element_bytes == 1 else 0)


def estimate(plan: Plan) -> dict[str, dict[str, float]]:
    """{'train': {...}, 'inference': {...}}: bytes per device of parameters, optimizer, gradients,
    activations (with every other temporary at the peak), kv_cache and total. See the module docstring."""
    c, (dp, fsdp, tp, sp) = plan.config, plan.mesh
    big, small = parameter_counts(c)
    p_dev = big / (fsdp * sp * tp) + small
    b = plan.batch_size / (dp * fsdp)
    n = b * plan.seq_len / sp                             # tokens on one device
    s = plan.dtype_bytes
    d, h, f, L = c.hidden_size, c.head_dim, c.intermediate_size, c.num_hidden_layers
    kv = c.kv_heads / tp
    remat = c.remat_block
    # Context parallelism: what one device holds for attention beyond its own tokens, per layer (elements).
    if sp == 1:
        attn_extra = 0.0
    elif plan.sp_strategy == "all_gather":                # every device gathers the full K and V
        attn_extra = 2 * b * plan.seq_len * kv * h * (1 - 1 / sp)
    elif plan.sp_strategy == "ring":                      # the neighbour's K/V block in flight
        attn_extra = 2 * n * kv * h
    elif plan.sp_strategy == "ulysses_ring":              # the group's all-to-all buffers (q, k, v, out over
        from lwm.parallel.sharding import ulysses_kv_repeat        # u devices) + the ring's K/V block in flight:
        u = plan.model_config.context_parallel_ulysses_size         # u n tokens of K r / u heads = n K r
        r = ulysses_kv_repeat(c.num_attention_heads // tp, c.kv_heads // tp, u)
        attn_extra = n * (2 * c.num_attention_heads / tp + 4 * kv * r) * h
    else:                                                 # ulysses: all-to-all buffers of q, k, v, out
        from lwm.parallel.sharding import ulysses_kv_repeat        # kv heads repeated to divide by sp
        attn_extra = n * (2 * c.num_attention_heads / tp + 2 * kv * ulysses_kv_repeat(
            c.num_attention_heads // tp, c.kv_heads // tp, sp)) * h
    v_dev = (c.vocab_size + (getattr(c, "vision_vocab_size", 0) or 0)) / tp
    full_layer = _saved_per_layer(c, "", tp)
    saved = L * n * _saved_per_layer(c, remat, tp) * s + n * TOP_LEVEL(d, h) * 4
    if plan.sp_strategy == "all_gather" and sp > 1 and remat != "nothing_saveable":
        saved += L * attn_extra * s                       # the gathered K/V are residuals of the backward
    grads = p_dev * 4
    loss_chunk = b * min(plan.loss_chunk_size, plan.seq_len) / sp
    phase_loss = saved + n * d * 4 + LOSS_LOGITS * loss_chunk * v_dev * 4 + LOSS_KERNEL * d * v_dev * 4
    cp_backward = attn_extra
    if plan.sp_strategy == "all_gather" and sp > 1:      # the layer's full dK, dV (and with remat K, V again)
        cp_backward = (4 if remat == "nothing_saveable" else 2) * b * plan.seq_len * kv * h
    remat_working = 1 + REMAT_WORKING if sp == 1 else REMAT_WORKING_CP
    phase_backward = saved + grads + n * full_layer * s * (
        BACKWARD_WORKING if remat != "nothing_saveable" else remat_working) + cp_backward * s
    phase_update = grads * (1 + UPDATE_TEMPS)
    peak = max(phase_loss, phase_backward, phase_update)
    opt = p_dev * (4 + (2 if plan.bf16_momentum else 4)) if plan.optimizer_state else 0.0
    batch = n * 13                                        # tokens, targets (int32), loss mask (f32), vision mask
    train = dict(parameters=p_dev * 4, optimizer=opt, gradients=grads,
                 activations=max(peak - grads, 0.0) + batch, kv_cache=0.0)
    cache = (2 * L * b * (plan.seq_len + plan.new_tokens) * c.kv_heads * kv_row_bytes(plan.cache_bytes or s, h)
             / (sp * tp))
    heads = c.num_attention_heads / tp / (sp if plan.sp_strategy == "ulysses" else 1)   # per local kernel
    tiles = PREFILL_TILES * b * c.scan_query_chunk_size * kc_len(c, plan.seq_len) * heads * 4
    gathered = v_dev * d * s if fsdp * sp > 1 else 0.0   # the embedding table, all-gathered for the lookup
    if sp == 1 or plan.sp_strategy == "ulysses":          # the all-to-all output replaces the local q, k, v
        cp_prefill = 0.0
    elif plan.sp_strategy == "all_gather":
        cp_prefill = PREFILL_GATHERED * 2 * b * plan.seq_len * kv * h * s
    else:
        cp_prefill = attn_extra * s
    if sp > 1 and plan.load_balance != "none":            # K/V put back in natural order for the cache, and
        cp_prefill += 2 * n * kv * h * s + n * d * 4      # the final hidden states
    prefill = n * PREFILL_WORKING_BYTES[s] * d + tiles + gathered + cp_prefill + b * v_dev * 4
    infer = dict(parameters=p_dev * s, optimizer=0.0, gradients=0.0, activations=prefill, kv_cache=cache)
    for part in (train, infer):
        part["total"] = sum(part.values())
    return dict(train=train, inference=infer)


def max_context(plan: Plan, device_bytes: float, mode: str = "train", multiple: int = 1024) -> int:
    """The longest sequence (a multiple of `multiple` * sp) whose `mode` total fits `device_bytes`; 0 if none."""
    step = multiple * plan.mesh[3]
    fits = lambda t: estimate(dataclasses.replace(plan, seq_len=t))[mode]["total"] <= device_bytes
    if not fits(step):
        return 0
    lo, hi = step, step * 2
    while fits(hi) and hi < 2**40:
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------------------------------
# The hardware question: the fewest devices that fit, over meshes, sp strategies, remat policies, cache dtypes.

SEARCH_REMATS = ("", "checkpoint_dots", "nothing_saveable")     # least recompute first: the preference order
REMAT_COST = {"": "none", "checkpoint_dots": "matmul outputs kept", "nothing_saveable": "layer recomputed"}


@dataclasses.dataclass(frozen=True)
class Fit:
    """One configuration that fits: `plan` (its config carries the remat policy) on `devices` devices, with
    `per_device` bytes of `mode` ('train' | 'inference') per device (estimate()'s total)."""
    mode: str
    devices: int
    plan: Plan
    per_device: float

    @property
    def remat(self) -> str:
        return self.plan.config.remat_block

    def flags(self) -> str:
        """The flags of `lwm.train` (mode 'train') or of the inference commands (lwm.text_chat,
        lwm.eval_needle, lwm.serve) that run this configuration."""
        p = self.plan
        updates = []
        if self.mode == "train" and self.remat:
            updates.append(f"remat_block='{self.remat}'")
        if p.mesh[3] > 1:
            mc = p.model_config
            updates += [f"attention_impl='{mc.attention_impl}'", f"context_parallel_strategy='{p.sp_strategy}'"]
            if p.sp_strategy == "ulysses_ring":
                updates.append(f"context_parallel_ulysses_size={mc.context_parallel_ulysses_size}")
            if p.load_balance != "none":
                updates.append(f"context_parallel_load_balance='{p.load_balance}'")
        dtype = "bf16" if p.dtype_bytes == 2 else "fp32"
        out = f"--mesh_dim={','.join(map(str, p.mesh))} --dtype={dtype}"
        if self.mode == "inference" and p.cache_bytes and p.cache_bytes != p.dtype_bytes:
            out += " --cache_dtype=" + {1: "int8", 2: "bf16", 4: "fp32"}[p.cache_bytes]
        if self.mode == "train":
            out += f" --train_dataset.json_dataset.seq_length={p.seq_len} --train_dataset.json_dataset.batch_size={p.batch_size}"
        if updates:
            out += ' --update_llama_config="dict(' + ",".join(updates) + ')"'
        return out


def meshes(n: int, batch_size: int = 1):
    """Every (dp, fsdp, tp, sp) of powers of two whose product is n (a power of two) and whose dp * fsdp
    divides batch_size. Order: dp, then fsdp, then tp ascending."""
    k = n.bit_length() - 1
    for a in range(k + 1):
        for b in range(k + 1 - a):
            if batch_size % 2 ** (a + b):
                continue
            for c in range(k + 1 - a - b):
                yield (2 ** a, 2 ** b, 2 ** c, 2 ** (k - a - b - c))


def _strategy_variants(config, strategy: str, sp: int) -> list:
    """The configs to try for `strategy` over sp devices: `config` itself, or for 'ulysses_ring' one per inner
    group size u = 2, 4, ..., sp / 2 (u = 1 is the ring, u = sp Ulysses); those the config refuses are left out."""
    if strategy != "ulysses_ring" or sp < 4:
        return [config] if strategy != "ulysses_ring" else []
    out, u = [], 2
    while u < sp:
        try:
            out.append(config.replace(attention_impl=config.attention_impl if config.context_parallel else "ring",
                                      context_parallel_strategy=strategy, context_parallel_ulysses_size=u))
        except (ValueError, TypeError):
            pass
        u *= 2
    return out


def search(config, seq_len: int, device_bytes: float, mode: str, *, batch_size: int = 1, dtype_bytes: int = 2,
           strategies=None, load_balance: str = "none", remats=SEARCH_REMATS, cache_bytes=(0,),
           max_devices: int = 2 ** 14, **plan_fields) -> list[Fit]:
    """The configurations of `mode` ('train' | 'inference') whose estimate() total fits `device_bytes` per
    device at the smallest power-of-two device count <= max_devices; [] when none does. Searched: every mesh
    of `meshes(n, batch_size)` the real run accepts (Plan's checks: heads over tp, batch over dp * fsdp, the
    sequence over sp and the chunk sizes), every context-parallel strategy in `strategies` (default: every
    one lwm.attention has; 'ulysses_ring' with every inner group size, _strategy_variants) when sp > 1, the remat policies `remats` (training only) and the cache element
    sizes `cache_bytes` (inference only; 0 = the compute dtype's). Sorted by preference: least recompute,
    then the smallest per-device total. `plan_fields`: the other Plan fields (optimizer_state, new_tokens, ...)."""
    strategies = tuple(strategies or SP_STRATEGIES)
    configs = [config.replace(remat_block=r) for r in (remats if mode == "train" else (config.remat_block,))]
    caches = cache_bytes if mode == "inference" else (0,)
    n = 1
    while n <= max_devices:
        fits = []
        for mesh in meshes(n, batch_size):
            for strategy in (strategies if mesh[3] > 1 else strategies[:1]):
                for c in (v for r in configs for v in _strategy_variants(r, strategy, mesh[3])):
                    for cb in caches:
                        try:
                            plan = Plan(c, seq_len, mesh, batch_size, dtype_bytes, strategy, load_balance,
                                        cache_bytes=cb, **plan_fields)
                        except ValueError:          # a mesh or strategy the real run refuses
                            break
                        total = estimate(plan)[mode]["total"]
                        if total <= device_bytes:
                            fits.append(Fit(mode, n, plan, total))
        if fits:
            rank = {r: i for i, r in enumerate(SEARCH_REMATS)}
            return sorted(fits, key=lambda f: (rank.get(f.remat, len(rank)) if mode == "train" else 0,
                                               f.per_device))
        n *= 2
    return []


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


# ---------------------------------------------------------------------------------------------------------
# XLA's own figures: compile the real train step / prefill on the current devices (simulated CPU devices
# with XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is imported; `main` does that).


def _mesh_string(mesh) -> str:
    return ",".join(str(x) for x in mesh)


def xla_train(plan: Plan, optimizer_updates: dict | None = None) -> dict[str, int]:
    """memory_analysis() of lwm.training.steps.train_step as lwm.train compiles it (same shardings, donation),
    for abstract inputs: nothing is allocated or run. Returns argument/output/alias/temp and peak bytes
    per device."""
    return _analysis(compile_train(plan, optimizer_updates))


def xla_prefill(plan: Plan) -> dict[str, int]:
    """memory_analysis() of the engine's prefill (parameters in the compute dtype, sharded by the table; the
    cache of seq_len + new_tokens slots is an output). Returns the same keys as xla_train."""
    return _analysis(compile_prefill(plan))


def compile_train(plan: Plan, optimizer_updates: dict | None = None):
    """The compiled train step of `plan` (under plan.model_config: its strategy and load balance), exactly as
    `lwm.train` builds it: `lwm.training.compile.shard_train_step` (same shardings, donation), lowered for
    an abstract (batch_size, seq_len) text batch."""
    import jax
    import jax.numpy as jnp

    from lwm.model import registry
    from lwm.parallel.sharding import make_mesh
    from lwm.training import optimizer as optimizer_lib
    from lwm.training import steps as ts
    from lwm.training.compile import shard_train_step

    c = plan.model_config
    dtype = {4: jnp.float32, 2: jnp.bfloat16}[plan.dtype_bytes]
    mesh = make_mesh(_mesh_string(plan.mesh), jax.devices()[:math.prod(plan.mesh)])
    task = ts.Task(registry.build_model("text", c, dtype), "text", 1.0, 0.0, plan.loss_chunk_size)
    tx, schedule = optimizer_lib.make_optimizer(
        {"adamw_optimizer": {"bf16_momentum": plan.bf16_momentum}, **(optimizer_updates or {})})
    step = shard_train_step(task, tx, schedule, mesh)
    return step.lower(plan.batch_size, plan.seq_len).compile()


def compile_prefill(plan: Plan):
    """The compiled engine prefill of `plan` (`lwm.inference.engine.Engine.lower_prefill` under
    plan.model_config; parameters in the compute dtype, sharded by the table; the cache of
    seq_len + new_tokens slots is an output)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from lwm.inference.engine import Engine
    from lwm.model.llama import LLaMAForCausalLM
    from lwm.model.shapes import param_shapes
    from lwm.parallel.sharding import batch_spec, make_mesh, param_shardings

    c = plan.model_config
    dtype = {4: jnp.float32, 2: jnp.bfloat16}[plan.dtype_bytes]
    mesh = make_mesh(_mesh_string(plan.mesh), jax.devices()[:math.prod(plan.mesh)])
    model = LLaMAForCausalLM(c, dtype=dtype, param_dtype=dtype)
    with jax.set_mesh(mesh):
        shapes = param_shapes(c, dtype)
        shardings = param_shardings(shapes, c, mesh)
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        bs = NamedSharding(mesh, batch_spec(mesh))
        ids = jax.ShapeDtypeStruct((plan.batch_size, plan.seq_len), jnp.int32, sharding=bs)
        engine = Engine(model, params, eos_id=-1, pad_id=0)
        return engine.lower_prefill(ids, plan.seq_len + plan.new_tokens).compile()


def _analysis(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
               temporaries=m.temp_size_in_bytes)
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out
