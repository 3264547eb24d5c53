"""Mesh strings, the parameter-rule table, pre-compile errors, and the real sharded train step == the unsharded one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lwm.model.llama import PRESETS, LLaMAConfig, LLaMAForCausalLM
from lwm.parallel.sharding import (MeshError, activation_spec, batch_spec, cache_specs, data_parallel_size,
                          sequence_parallel_size, check_divisible, check_model_mesh, make_mesh, match_partition_rules,
                          parse_mesh_dim, param_spec)


def test_parse_mesh_dim():
    assert parse_mesh_dim("1,-1,4,1", 8) == ((1, 2, 4, 1), False)
    assert parse_mesh_dim("!1,-1,1,4", 8) == ((1, 2, 1, 4), True)
    assert parse_mesh_dim("dp:2,sp:4", 8) == ((2, 1, 1, 4), False)
    for bad, msg in [("1,3,1,1", "needs 3 devices but 8"), ("1,-1,-1,1", "at most one"),
                     ("1,-1,3,1", "not divisible by 3"), ("1,2,4", "expected 4"), ("1,x,1,1", "integers"),
                     ("pp:2", "unknown axis")]:
        with pytest.raises(MeshError, match=msg):
            parse_mesh_dim(bad, 8)
    mesh = make_mesh("1,2,2,2")
    assert dict(mesh.shape) == {"dp": 1, "fsdp": 2, "tp": 2, "sp": 2}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_parameter_matches_a_rule(preset, scan_layers):
    cfg = LLaMAConfig.load(preset).replace(scan_layers=scan_layers)
    shapes = jax.eval_shape(lambda: LLaMAForCausalLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), int)))
    specs = match_partition_rules(shapes["params"], cfg)
    flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    assert flat and all(isinstance(s, P) for _, s in flat)
    for path, spec in flat:
        key = jax.tree_util.keystr(path)
        if "wq" in key:
            assert tuple(spec) == ((None,) if scan_layers else ()) + (("fsdp", "sp"), "tp")


def test_unmatched_parameter_is_an_error():
    with pytest.raises(MeshError, match="matches no rule"):
        match_partition_rules({"transformer": {"mystery": {"kernel": jnp.zeros((4, 4))}}}, LLaMAConfig())
    assert param_spec("transformer/h/scan_decoder/ffn_norm/kernel", 2, scan_axis=0) == P(None, None)
    # Optimizer states whose paths end in parameter paths reuse the rules; scalars are replicated.
    opt = {"mu": {"lm_head": {"kernel": jnp.zeros((4, 8))}}, "count": jnp.zeros((), jnp.int32)}
    assert match_partition_rules(opt, LLaMAConfig()) == {"mu": {"lm_head": {"kernel": P(("fsdp", "sp"), "tp")}}, "count": P()}


def test_errors_before_compile():
    mesh = make_mesh("1,1,4,2")
    cfg = LLaMAConfig.load("tiny")  # 4 heads, 2 kv heads
    with pytest.raises(MeshError, match="num_key_value_heads=2 is not divisible by tp=4"):
        check_model_mesh(cfg, mesh)
    mesh = make_mesh("2,1,1,4")
    with pytest.raises(MeshError, match="batch size 3"):
        check_model_mesh(cfg, mesh, batch_size=3)
    with pytest.raises(MeshError, match="sequence length 102 is not divisible by sp=4"):
        check_model_mesh(cfg, mesh, seq_len=102)
    with pytest.raises(MeshError, match="not a multiple of scan_query_chunk_size"):
        check_model_mesh(cfg.replace(scan_query_chunk_size=48), mesh, seq_len=256)
    check_model_mesh(cfg, mesh, seq_len=512, batch_size=4)
    with pytest.raises(MeshError, match="not divisible"):
        check_divisible({"lm_head": {"kernel": jnp.zeros((6, 8))}},
                        {"lm_head": {"kernel": P(("fsdp", "sp"), "tp")}}, make_mesh("1,1,2,4"))


def _parity_setup(param_scan_axis: int):
    """The tiny preset with the ring (sp=2 on 1,2,2,2) and its dense twin, the real optimizer at a constant
    1e-2, and a packed (B=4, T=64) batch with two segments per row and a random loss mask."""
    from lwm.training import optimizer as optimizer_lib
    from lwm.training import steps as ts

    cfg = LLaMAConfig.load("tiny").replace(attention_impl="ring", scan_query_chunk_size=16, scan_key_chunk_size=16,
                                           param_scan_axis=param_scan_axis)
    tx, schedule = optimizer_lib.make_optimizer({"adamw_optimizer": {
        "lr": 1e-2, "lr_warmup_steps": 0, "lr_schedule_type": "warmup_constant"}})
    task = lambda c: ts.Task(LLaMAForCausalLM(c), "text", 1.0, 0.0, 16)
    rng = np.random.default_rng(0)
    b, t = 4, 64
    tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    seg = np.repeat(np.array([[1] * 40 + [2] * 24], np.int32), b, axis=0)
    pos = np.concatenate([np.arange(40), np.arange(24)])[None].repeat(b, 0).astype(np.int32)
    batch = dict(input_tokens=tokens[:, :-1], target_tokens=tokens[:, 1:],
                 loss_masks=(rng.random((b, t)) > 0.2).astype(np.float32), input_vision_masks=np.zeros((b, t), bool),
                 target_vision_masks=np.zeros((b, t), bool), segment_ids=seg, position_ids=pos)
    return cfg, task(cfg), task(cfg.replace(attention_impl="dense")), tx, schedule, batch


def _run_steps(step_fn, state, rng, batch, n=2):
    losses = []
    for _ in range(n):
        state, rng, metrics = step_fn(state, rng, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("param_scan_axis", [0, 1])
def test_real_sharded_train_step_equals_unsharded(param_scan_axis):
    """The real step as lwm.train compiles it (lwm.training.compile.shard_train_step: shardings, donation) on
    1,2,2,2 (dp, fsdp, tp, sp; the ring over sp) gives the unsharded step's losses and updated parameters
    (plain jax.jit of lwm.training.steps.train_step, dense attention, no mesh) to float32 tolerance."""
    import functools

    from lwm.parallel.multihost import global_batch, host_array, host_shard_from_mesh
    from lwm.training import steps as ts
    from lwm.training.compile import shard_train_step

    cfg, task, dense_task, tx, schedule, batch = _parity_setup(param_scan_axis)
    init = ts.init_train_state(jax.random.PRNGKey(0), task=dense_task, tx=tx)
    init = jax.tree.map(np.asarray, init)        # host copies: the sharded step donates what it is given
    rng = np.asarray(jax.random.PRNGKey(1))
    ref_step = jax.jit(functools.partial(ts.train_step, task=dense_task, schedule=schedule))
    ref_state, ref_losses = _run_steps(ref_step, init, rng, {k: jnp.asarray(v) for k, v in batch.items()})

    mesh = make_mesh("1,2,2,2")
    check_model_mesh(cfg, mesh, seq_len=64, batch_size=4)
    step = shard_train_step(task, tx, schedule, mesh)
    wq_spec = (P(None, ("fsdp", "sp"), "tp") if param_scan_axis == 0 else P(("fsdp", "sp"), None, "tp"))
    wq = lambda state: state.params["params"]["transformer"]["h"]["scan_decoder"]["attention"]["wq"]["kernel"]
    assert wq(step.state_shardings).spec == wq_spec
    with jax.set_mesh(mesh):
        sharded_batch = global_batch(batch, mesh, host_shard_from_mesh(mesh))
        state = jax.device_put(init, step.state_shardings)
        state, losses = _run_steps(step.train, state, jax.device_put(rng, step.replicated), sharded_batch)
        assert wq(state).sharding.spec == wq_spec                # the output stays sharded by the table

        # Negative control: the same check fails when the sequence reaches the step in the wrong order
        # (the two sp halves swapped), the error a wrong batch layout would make.
        swapped = {k: np.concatenate([v[:, 32:], v[:, :32]], axis=1) for k, v in batch.items()}
        fresh = jax.device_put(init, step.state_shardings)
        _, wrong_losses = _run_steps(step.train, fresh, jax.device_put(rng, step.replicated),
                                     global_batch(swapped, mesh, host_shard_from_mesh(mesh)))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[1] < losses[0]
    assert not np.allclose(wrong_losses, ref_losses, rtol=1e-5)

    # Gradients, through the AdamW moments (linear in them: mu, and nu in their squares): normwise float32
    # tolerance per tensor. Parameters: within 1% of one Adam step (lr = 1e-2). Adam divides each gradient
    # by its own scale, so a rounding-level difference in a near-zero gradient moves that element by a
    # visible fraction of lr (seen: 2 of 32768 lm_head elements, 0.5% of lr, after 2 steps).
    moved = max(float(np.max(np.abs(np.asarray(w) - s)))
                for w, s in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(init.params)))
    assert moved > 100 * 1e-4                                 # the parameters did change: not equal by accident
    for name, tol in (("opt_state", 1e-4), ("params", None)):
        got_tree, want_tree = getattr(state, name), getattr(ref_state, name)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_tree), jax.tree.leaves(want_tree)):
            g, w = host_array(g).astype(np.float64), np.asarray(w, np.float64)
            limit = tol * float(np.max(np.abs(w))) if tol else 1e-2 * 1e-2
            assert np.max(np.abs(g - w), initial=0.0) <= limit, (name, jax.tree_util.keystr(path),
                                                                   np.max(np.abs(g - w)), limit)
    assert int(host_array(state.step)) == int(ref_state.step) == 2


def test_mesh_fallback_is_reported(monkeypatch, caplog):
    """When jax's topology-aware layout fails, the plain reshape is used and a warning says so."""
    import lwm.parallel.sharding as sharding

    with caplog.at_level("WARNING", logger="lwm.parallel.sharding"):
        sharding.make_mesh("1,1,1,4", jax.devices()[:4])
    assert not caplog.records  # negative control: the normal path says nothing

    def refuse(*args, **kwargs):
        raise ValueError("no topology for these devices")

    monkeypatch.setattr(sharding.mesh_utils, "create_device_mesh", refuse)
    with caplog.at_level("WARNING", logger="lwm.parallel.sharding"):
        mesh = sharding.make_mesh("1,1,1,4", jax.devices()[:4])
    assert dict(mesh.shape) == dict(dp=1, fsdp=1, tp=1, sp=4)
    assert len(caplog.records) == 1
    assert "--mesh_dim=1,1,1,4" in caplog.text and "no topology for these devices" in caplog.text


def test_partition_rules_need_the_model_config():
    """No caller can forget param_scan_axis: the rules take the model config, and an int is refused."""
    tree = {"transformer": {"h": {"scan_decoder": {"attention": {"wq": {"kernel": jnp.zeros((2, 8, 16))}}}}}}
    with pytest.raises(TypeError, match="config must be the model config"):
        match_partition_rules(tree, 1)
    cfg0, cfg1 = LLaMAConfig(), LLaMAConfig(param_scan_axis=1)
    wq = lambda cfg: match_partition_rules(tree, cfg)["transformer"]["h"]["scan_decoder"]["attention"]["wq"]["kernel"]
    assert wq(cfg0) == P(None, ("fsdp", "sp"), "tp") and wq(cfg1) == P(("fsdp", "sp"), None, "tp")


def test_specs_come_from_one_table():
    mesh = make_mesh("1,2,2,2")
    assert batch_spec(mesh) == P(("dp", "fsdp"), "sp")
    assert activation_spec(mesh) == P(("dp", "fsdp"), "sp", "tp", None)
    # k, v (L, B, K, S, H): rows over the data axes, kv heads over tp, slots over sp
    assert cache_specs(mesh)["k"] == cache_specs(mesh)["v"] == P(None, ("dp", "fsdp"), "tp", "sp", None)
    assert cache_specs(mesh)["segment_ids"] == P(("dp", "fsdp"), "sp")
    assert sequence_parallel_size(mesh) == 2 and data_parallel_size(mesh) == 2
    assert sequence_parallel_size() == 1  # no ambient mesh


def test_check_model_mesh_names_context_parallel_limits():
    cfg = LLaMAConfig.load("tiny").replace(attention_impl="ring", context_parallel_load_balance="zigzag")
    with pytest.raises(MeshError, match=r"sequence length 36 is not divisible by 2\*sp=8"):
        check_model_mesh(cfg, make_mesh("1,1,1,4", jax.devices()[:4]), seq_len=36)
    cfg = LLaMAConfig.load("tiny").replace(attention_impl="ring", context_parallel_strategy="ulysses")
    with pytest.raises(MeshError, match=r"num_attention_heads=4 / tp=1 = 4 heads, sp=8"):
        check_model_mesh(cfg, make_mesh("1,1,1,8"), seq_len=64)
