"""The device mesh (`--mesh_dim`), the one parameter-sharding table (no other (regex, P(...)) rule in lwm/ or
benchmarks/: tests/test_one_home.py::test_rule_holds[sharding_table]), and logical activation constraints.

Mesh axes, in this order everywhere: dp (data), fsdp (fully-sharded data), tp (tensor), sp (sequence: the
ring). Parameters are sharded over ('fsdp', 'sp') on their model dimension and over 'tp' on heads / hidden
units, as in the original LWM. Activations name their dimensions logically ('batch', 'seq', 'heads', ...)
and `LOGICAL_AXES` maps those names to mesh axes in one place (tests/test_one_home.py::
test_rule_holds[logical_axes]).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("dp", "fsdp", "tp", "sp")
BATCH_AXES = ("dp", "fsdp")   # the batch dimension is split over both data axes
HEAD_AXIS = "tp"              # attention heads / hidden units
SEQ_AXIS = "sp"               # the sequence: context parallelism (ring, all-gather, Ulysses)

# Ordered: the first rule whose regex is found in a parameter's '/'-joined path wins. Specs are for the
# unscanned parameter; scanned parameters (under 'scan_decoder') get None inserted at the layer axis.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    # embeddings (V, D)
    (r"transformer/wte/embedding$", P("tp", ("fsdp", "sp"))),
    (r"transformer/vte/embedding$", P("tp", ("fsdp", "sp"))),
    # attention: wq (D, N*H), wk/wv (D, K*H), wo (N*H, D)
    (r"attention/(wq|wk|wv)/kernel$", P(("fsdp", "sp"), "tp")),
    (r"attention/wo/kernel$", P("tp", ("fsdp", "sp"))),
    # feed-forward: w1/w3 (D, F), w2 (F, D)
    (r"feed_forward/(w1|w3)/kernel$", P(("fsdp", "sp"), "tp")),
    (r"feed_forward/w2/kernel$", P("tp", ("fsdp", "sp"))),
    # norms (D,)
    (r"(attention_norm|ffn_norm)/kernel$", P(None)),
    (r"transformer/ln_f/kernel$", P(None)),
    # output heads (D, V)
    (r"lm_head/kernel$", P(("fsdp", "sp"), "tp")),
    (r"vision_head/kernel$", P(("fsdp", "sp"), "tp")),
)

# Logical activation dimension -> mesh axes.
LOGICAL_AXES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "seq": SEQ_AXIS,
    "heads": HEAD_AXIS,
    "kv_heads": HEAD_AXIS,
    "mlp": HEAD_AXIS,
    "vocab": HEAD_AXIS,
    "embed": None,
    "head_dim": None,
}


class MeshError(ValueError):
    """A mesh that does not fit the devices, the model or the batch."""


def parse_mesh_dim(mesh_dim: str, num_devices: int | None) -> tuple[tuple[int, ...], bool]:
    """'1,-1,4,1' -> (1, n/4, 4, 1). Also 'dp:1,fsdp:-1,tp:4,sp:1'. A leading '!' allows splitting
    physical device axes (as in the original). Returns (dims in MESH_AXES order, allow_split).
    num_devices=None checks the syntax only and keeps a -1 as it is (the flag parser, the memory planner).
    Raises MeshError naming --mesh_dim."""
    text = mesh_dim.strip()
    allow_split = text.startswith("!")
    text = text.lstrip("!")
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if any(":" in p for p in parts):
        named = {}
        for p in parts:
            name, _, value = p.partition(":")
            if name not in MESH_AXES:
                raise MeshError(f"--mesh_dim={mesh_dim!r}: unknown axis {name!r}; axes are {MESH_AXES}")
            named[name] = value
        parts = [named.get(a, "1") for a in MESH_AXES]
    if len(parts) != len(MESH_AXES):
        raise MeshError(f"--mesh_dim={mesh_dim!r}: expected {len(MESH_AXES)} sizes for axes {MESH_AXES}")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise MeshError(f"--mesh_dim={mesh_dim!r}: sizes must be integers (one may be -1)") from None
    if dims.count(-1) > 1:
        raise MeshError(f"--mesh_dim={mesh_dim!r}: at most one axis may be -1")
    if any(d == 0 or d < -1 for d in dims):
        raise MeshError(f"--mesh_dim={mesh_dim!r}: sizes must be positive (or a single -1)")
    if num_devices is None:
        return tuple(dims), allow_split
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if num_devices % known:
            raise MeshError(f"--mesh_dim={mesh_dim!r}: {num_devices} devices are not divisible by {known}")
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise MeshError(f"--mesh_dim={mesh_dim!r} needs {math.prod(dims)} devices but {num_devices} are "
                        "available")
    return tuple(dims), allow_split


def make_mesh(mesh_dim: str = "1,-1,1,1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the ('dp','fsdp','tp','sp') mesh with Auto axes (jax.make_mesh defaults to Explicit)."""
    devices = list(jax.devices() if devices is None else devices)
    dims, allow_split = parse_mesh_dim(mesh_dim, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(dims, devices, allow_split_physical_axes=allow_split)
    except (AssertionError, ValueError, NotImplementedError) as e:
        logging.getLogger(__name__).warning(
            "--mesh_dim=%s: jax's topology-aware device mesh failed (%s: %s); devices are laid out in their "
            "listed order instead, so mesh neighbours may not be physical neighbours", mesh_dim,
            type(e).__name__, e)
        grid = np.asarray(devices).reshape(dims)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_spec(path: str, ndim: int, scan_axis: int = 0) -> P:
    """The PartitionSpec of one parameter from PARAM_RULES; raises if no rule matches."""
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, path):
            spec = tuple(spec)
            if "scan_decoder" in path:
                spec = spec[:scan_axis] + (None,) + spec[scan_axis:]
            if len(spec) > ndim:
                raise MeshError(f"parameter {path}: rule {pattern!r} gives {len(spec)} dims, array has {ndim}")
            return P(*spec)
    raise MeshError(f"parameter {path!r} matches no rule in lwm.parallel.sharding.PARAM_RULES; add one")


def match_partition_rules(tree, config):
    """PartitionSpecs for a parameter tree or any tree whose leaf paths end in parameter paths (optimizer
    states). Scalars and size-1 leaves (step counters) are replicated; any other unmatched leaf raises.

    config: the model config (`LLaMAConfig` or a subclass); its `param_scan_axis` says where the layer axis
    of scanned parameters sits. It is required so that no caller can shard a param_scan_axis=1 model with
    the layer axis in the wrong place."""
    scan_axis = getattr(config, "param_scan_axis", None)
    if scan_axis not in (0, 1):
        raise TypeError(f"match_partition_rules(tree, config): config must be the model config (with "
                        f"param_scan_axis 0 or 1), got {config!r}")

    def spec(path, leaf):
        shape = np.shape(leaf)
        if len(shape) == 0 or math.prod(shape) == 1:
            return P()
        return param_spec(_path_str(path), len(shape), scan_axis)

    return jax.tree_util.tree_map_with_path(spec, tree)


def check_divisible(tree, specs, mesh) -> None:
    """Raise before compiling when a sharded dimension is not divisible by its mesh axes."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(flat, flat_specs):
        for dim, axes in zip(np.shape(leaf), tuple(spec)):
            n = axis_size(mesh, axes)
            if dim % n:
                raise MeshError(f"parameter {_path_str(path)} dim {dim} is not divisible by mesh axes {axes} "
                                f"of size {n}")


def param_shardings(tree, config, mesh: Mesh):
    """NamedShardings of a parameter (or train-state) tree on `mesh`, checked for divisibility first."""
    specs = match_partition_rules(tree, config)
    check_divisible(tree, specs, mesh)
    return named_shardings(specs, mesh)


def named_shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _batch(mesh):
    """The batch entry of a spec: the data axes `mesh` has (all of them when mesh is None), or None."""
    kept = tuple(a for a in BATCH_AXES if mesh is None or a in mesh.axis_names)
    return kept or None


def _axis(mesh, name: str):
    return name if mesh is None or name in mesh.axis_names else None


def batch_spec(mesh=None) -> P:
    """(B, T) token arrays (ids, targets, masks, segment and position ids): P(('dp', 'fsdp'), 'sp')."""
    return P(_batch(mesh), _axis(mesh, SEQ_AXIS))


def activation_spec(mesh=None) -> P:
    """(B, T, N|K, H) attention inputs/outputs: P(('dp', 'fsdp'), 'sp', 'tp', None)."""
    return P(_batch(mesh), _axis(mesh, SEQ_AXIS), _axis(mesh, HEAD_AXIS), None)


def token_spec(mesh=None) -> P:
    """(B, T, N|K, H) decode-step tokens, not split along T: P(('dp', 'fsdp'), None, 'tp', None)."""
    return P(_batch(mesh), None, _axis(mesh, HEAD_AXIS), None)


def cache_specs(mesh=None) -> dict:
    """KV cache dict(k, v: (L, B, K, S, H), segment_ids: (B, S)) (`lwm.model.llama.init_cache`, the layout decode
    reads) sharded along S over 'sp', B over ('dp', 'fsdp'), K over 'tp':
    k, v P(None, ('dp', 'fsdp'), 'tp', 'sp', None); segment_ids P(('dp', 'fsdp'), 'sp'). An int8/fp8 cache's
    k_scale, v_scale (L, B, K, S) shard like their values: P(None, ('dp', 'fsdp'), 'tp', 'sp')."""
    kv = P(None, _batch(mesh), _axis(mesh, HEAD_AXIS), _axis(mesh, SEQ_AXIS), None)
    scale = P(*kv[:4])
    return dict(k=kv, v=kv, k_scale=scale, v_scale=scale, segment_ids=batch_spec(mesh))


def sequence_parallel_size(mesh=None) -> int:
    """Size of the 'sp' axis of `mesh` (default: the ambient mesh); 1 when there is none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or SEQ_AXIS not in mesh.axis_names:
        return 1
    return int(dict(mesh.shape)[SEQ_AXIS])


def data_parallel_size(mesh=None) -> int:
    """dp * fsdp of `mesh` (default: the ambient mesh); 1 when there is none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        return 1
    shape = dict(mesh.shape)
    return math.prod(shape.get(a, 1) for a in BATCH_AXES)


def has_full_mesh(mesh=None) -> bool:
    """True when `mesh` (default: the ambient mesh) has all of MESH_AXES."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return mesh is not None and not mesh.empty and set(MESH_AXES) <= set(mesh.axis_names)


def logical_spec(logical: Sequence[str | None]) -> P:
    return P(*(LOGICAL_AXES[name] if name is not None else None for name in logical))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op when no mesh is set (single-device use)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(logical))


def ulysses_kv_repeat(n_local: int, k_local: int, sp: int) -> int:
    """How many times each tp-local kv head is repeated so that the kv heads divide by sp (1 = none)."""
    return sp // math.gcd(k_local, sp)


def check_ulysses_heads(N: int, K: int, tp: int, sp: int) -> int:
    """Raises ValueError naming the numbers when Ulysses cannot split the heads; returns the kv repeat."""
    n_local, k_local = N // tp, K // tp
    if n_local % sp:
        raise ValueError(f"context_parallel_strategy='ulysses' needs the query heads per tp shard divisible by "
                         f"sp: num_attention_heads={N} / tp={tp} = {n_local} heads, sp={sp}; use the 'ring' or "
                         "'all_gather' strategy, or a mesh with sp dividing the heads")
    return ulysses_kv_repeat(n_local, k_local, sp)


def check_ulysses_ring(N: int, K: int, tp: int, sp: int, u: int) -> int:
    """Raises ValueError naming the numbers when 'ulysses_ring' cannot use inner groups of u devices (u must
    divide sp and the tp-local query heads N/tp); returns the kv repeat inside a group (kv heads need not
    divide: they are repeated, `ulysses_kv_repeat`)."""
    if u < 1 or sp % u:
        raise ValueError(f"context_parallel_ulysses_size={u} must be >= 1 and divide sp={sp} "
                         "(context_parallel_strategy='ulysses_ring' splits sp into groups of that size)")
    n_local, k_local = N // tp, K // tp
    if n_local % u:
        raise ValueError(f"context_parallel_ulysses_size={u} must divide the query heads per tp shard: "
                         f"num_attention_heads={N} / tp={tp} = {n_local} heads")
    return ulysses_kv_repeat(n_local, k_local, u)


def check_model_mesh(config, mesh: Mesh, *, seq_len: int | None = None, batch_size: int | None = None) -> None:
    """Clear errors, before any compile, when the mesh does not divide the heads, batch or sequence."""
    tp, sp = mesh.shape["tp"], mesh.shape["sp"]
    batch_shards = mesh.shape["dp"] * mesh.shape["fsdp"]
    if config.num_attention_heads % tp:
        raise MeshError(f"num_attention_heads={config.num_attention_heads} is not divisible by tp={tp}")
    if config.kv_heads % tp:
        raise MeshError(f"num_key_value_heads={config.kv_heads} is not divisible by tp={tp}")
    if batch_size is not None and batch_size % batch_shards:
        raise MeshError(f"batch size {batch_size} is not divisible by dp*fsdp={batch_shards}")
    if config.context_parallel and config.context_parallel_strategy == "ulysses" and sp > 1:
        try:
            check_ulysses_heads(config.num_attention_heads, config.kv_heads, tp, sp)
        except ValueError as e:
            raise MeshError(str(e)) from None
    if config.context_parallel and config.context_parallel_strategy == "ulysses_ring" and sp > 1:
        try:
            check_ulysses_ring(config.num_attention_heads, config.kv_heads, tp, sp,
                               config.context_parallel_ulysses_size)
        except ValueError as e:
            raise MeshError(str(e)) from None
    if seq_len is not None:
        balance = config.context_parallel_load_balance if config.context_parallel else "none"
        parts = 2 * sp if balance == "zigzag" and sp > 1 else sp
        if seq_len % parts:
            need = f"sp={sp}" if parts == sp else f"2*sp={parts} (context_parallel_load_balance='zigzag')"
            raise MeshError(f"sequence length {seq_len} is not divisible by {need}")
        local = seq_len // parts  # tokens per contiguous run of a device's shard
        if config.attention_impl != "dense":
            for name in ("scan_query_chunk_size", "scan_key_chunk_size"):
                chunk = getattr(config, name)
                if local > chunk and local % chunk:
                    raise MeshError(
                        f"sequence length {seq_len} / {parts} = {local} tokens per contiguous run of a device's "
                        f"shard (sp={sp}, load balance {balance!r}) is not a multiple of {name}={chunk}")
