"""Checkpoint formats: streaming msgpack (the original's), orbax (lwm/checkpoint/formats.py); the atomic Checkpointer
(lwm/checkpoint/manager.py)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import flax.serialization
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lwm.checkpoint import formats as ckpt
from lwm.utils import safe_pickle
from lwm.checkpoint.manager import Checkpointer, checkpoint_spec, latest, read_dataset_state, read_metadata

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params(seed=0):
    """A tiny LWM-shaped linen tree (scanned layers on axis 0), with values that are not bf16-exact."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return {
        "transformer": {
            "wte": {"embedding": f(16, 8)},
            "h": {"scan_decoder": {"attention": {"wq": {"kernel": f(2, 8, 8)}, "wo": {"kernel": f(2, 8, 8)}},
                                   "attention_norm": {"kernel": f(2, 8)}}},
            "ln_f": {"kernel": f(8)},
        },
        "lm_head": {"kernel": f(8, 16)},
    }


@pytest.fixture(scope="module")
def train_state():
    """A TrainState as the original keeps it (params wrapped in {'params': ...}), after one adamw step."""
    state = TrainState.create(apply_fn=None, params={"params": _params()}, tx=optax.adamw(1e-2))
    grads = jax.tree.map(jnp.ones_like, state.params)
    return state.apply_gradients(grads=grads)


def _assert_trees_equal(a, b):
    fa, fb = flatten_dict(flax.serialization.to_state_dict(a)), flatten_dict(flax.serialization.to_state_dict(b))
    assert fa.keys() == fb.keys()
    for key in fa:
        x, y = np.asarray(fa[key]), np.asarray(fb[key])
        if not isinstance(fb[key], int):                # TrainState.create's python int step loads as int32
            assert x.dtype == y.dtype, key
        assert x.shape == y.shape, key
        np.testing.assert_array_equal(x, y, err_msg=str(key))


def _independent_write(path, tree, dtype=None, use_bin_type=True):
    """The format as the original writes it, with msgpack and flax.serialization directly
    (use_bin_type=False: how msgpack < 1.0 packed bytes)."""
    packer = msgpack.Packer(use_bin_type=use_bin_type)
    with open(path, "wb") as f:
        for key, value in flatten_dict(flax.serialization.to_state_dict(tree)).items():
            value = np.asarray(value)
            if dtype is not None and value.dtype == np.float32:
                value = value.astype(dtype)
            f.write(packer.pack((key, flax.serialization.to_bytes(value))))


def test_params_round_trip_fp32_and_bf16(tmp_path):
    params = _params()
    target = jax.eval_shape(lambda: params)
    ckpt.save_streaming(str(tmp_path / "fp32"), params, float_dtype="fp32")
    _, loaded = ckpt.load_checkpoint(f"params::{tmp_path / 'fp32'}", params_target=target)
    _assert_trees_equal(loaded["params"], params)

    ckpt.save_streaming(str(tmp_path / "bf16"), params)                 # no cast: stored as they are
    ckpt.save_streaming(str(tmp_path / "bf16"), params, float_dtype="bf16")
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    _assert_trees_equal(ckpt.load_streaming(str(tmp_path / "bf16")), rounded)   # no target: stored dtype
    as_f32 = ckpt.load_streaming(str(tmp_path / "bf16"), target)                # target dtype wins
    _assert_trees_equal(as_f32, jax.tree.map(lambda x: x.astype(jnp.float32), rounded))
    # Negative control: bf16 really lost bits, so the fp32 comparison above is not vacuous.
    assert not np.array_equal(as_f32["lm_head"]["kernel"], params["lm_head"]["kernel"])
    assert not os.path.exists(tmp_path / "bf16.tmp")


def test_train_state_round_trip_and_trainstate_params(tmp_path, train_state):
    path = str(tmp_path / "streaming_train_state")
    ckpt.save_streaming(path, train_state)
    keys = [k for k, _ in ckpt.iter_streaming(path)]
    assert ("step",) in keys and ("params", "params", "lm_head", "kernel") in keys
    assert ("opt_state", "0", "mu", "params", "transformer", "wte", "embedding") in keys
    target = jax.eval_shape(lambda: train_state)
    restored, params = ckpt.load_checkpoint(f"trainstate::{path}", train_state_target=target)
    assert params is None and isinstance(restored, TrainState)
    _assert_trees_equal(restored, train_state)          # step, params, adam mu/nu/count, empty states
    assert int(restored.step) == 1

    state, params = ckpt.load_checkpoint(f"trainstate_params::{path}", train_state_target=target)
    assert state is None
    _assert_trees_equal(params["params"], train_state.params["params"])
    with pytest.raises(ckpt.CheckpointError, match="whole train state"):
        ckpt.load_checkpoint(f"trainstate::{path}", disallow_trainstate=True)


def test_reads_independently_written_file_and_writes_the_same_bytes(tmp_path):
    params = _params(1)
    _independent_write(tmp_path / "theirs", params, dtype=jnp.bfloat16)
    _, loaded = ckpt.load_checkpoint(f"params::{tmp_path / 'theirs'}")
    _assert_trees_equal(loaded["params"], jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    ckpt.save_streaming(str(tmp_path / "ours"), params, float_dtype="bf16")
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
    _independent_write(tmp_path / "old_msgpack", params, use_bin_type=False)
    _assert_trees_equal(ckpt.load_streaming(str(tmp_path / "old_msgpack")), params)
    (tmp_path / "flax").write_bytes(flax.serialization.to_bytes(params))      # the original's flax_params::
    _, loaded = ckpt.load_checkpoint(f"flax_params::{tmp_path / 'flax'}",
                                     params_target=jax.eval_shape(lambda: params))
    _assert_trees_equal(loaded["params"], params)


def test_errors_name_the_key(tmp_path):
    params = _params()
    path = str(tmp_path / "p")
    ckpt.save_streaming(path, params)
    target = jax.eval_shape(lambda: params)
    ckpt.load_streaming(path, target)                   # control: the right target loads
    bad = jax.eval_shape(lambda: params)
    bad["lm_head"]["kernel"] = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    with pytest.raises(ckpt.CheckpointError, match=r"lm_head/kernel: checkpoint shape \(8, 16\) != target "
                                                   r"shape \(8, 32\)"):
        ckpt.load_streaming(path, bad)
    bigger = jax.eval_shape(lambda: {**params, "extra": {"kernel": jnp.zeros(3)}})
    with pytest.raises(ckpt.CheckpointError, match=r"extra/kernel: missing from the checkpoint"):
        ckpt.load_streaming(path, bigger)
    smaller = jax.eval_shape(lambda: {"transformer": params["transformer"]})
    with pytest.raises(ckpt.CheckpointError, match=r"lm_head/kernel: unexpected key"):
        ckpt.load_streaming(path, smaller)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-5])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_streaming(path)
    with pytest.raises(ckpt.CheckpointError, match="unknown type 'param'"):
        ckpt.load_checkpoint(f"param::{path}")
    with pytest.raises(ckpt.CheckpointError, match="float_dtype='bf17' is not one of"):
        ckpt.save_streaming(path, params, float_dtype="bf17")


def _model_shapes(**updates):
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

    cfg = LLaMAConfig.load("tiny").replace(**updates)
    return jax.eval_shape(lambda: LLaMAForCausalLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))[
        "params"]


def test_layer_layout_and_train_state_errors_name_the_setting(tmp_path, train_state):
    layouts = {"scanned": dict(), "unrolled": dict(scan_layers=False), "axis1": dict(param_scan_axis=1)}
    shapes = {name: _model_shapes(**u) for name, u in layouts.items()}
    for name, tree in shapes.items():
        ckpt.save_streaming(str(tmp_path / name), jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree))
        ckpt.load_streaming(str(tmp_path / name), tree)               # control: the same layout loads
    cases = [("scanned", "unrolled", r"saved with scan_layers=True\): load it with --llama.scan_layers=True"),
             ("unrolled", "scanned", r"saved with scan_layers=False\): load it with --llama.scan_layers=False"),
             ("axis1", "scanned", r"scan_decoder/.*other param_scan_axis\): flip --llama.param_scan_axis"),
             ("scanned", "axis1", r"other param_scan_axis")]
    for saved, target, message in cases:
        with pytest.raises(ckpt.CheckpointError, match=message):
            ckpt.load_checkpoint(f"params::{tmp_path / saved}", params_target=shapes[target])
    # A whole train state named with params:: (with and without a target) points at trainstate_params::.
    ckpt.save_streaming(str(tmp_path / "state"), train_state)
    target = jax.eval_shape(lambda: _params())
    for kw in (dict(params_target=target), {}):
        with pytest.raises(ckpt.CheckpointError, match="load its parameters with trainstate_params::PATH"):
            ckpt.load_checkpoint(f"params::{tmp_path / 'state'}", **kw)
    _, params = ckpt.load_checkpoint(f"trainstate_params::{tmp_path / 'state'}", params_target=target)
    assert params["params"]["lm_head"]["kernel"].shape == (8, 16)


def test_load_places_each_tensor_on_its_sharding(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tp"))
    params = _params()
    ckpt.save_streaming(str(tmp_path / "p"), params)
    specs = {"transformer": {"wte": {"embedding": P("tp", "fsdp")},
                             "h": {"scan_decoder": {"attention": {"wq": {"kernel": P(None, "fsdp", "tp")},
                                                                  "wo": {"kernel": P(None, "tp", "fsdp")}},
                                                    "attention_norm": {"kernel": P()}}},
                             "ln_f": {"kernel": P()}},
             "lm_head": {"kernel": P("fsdp", "tp")}}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    loaded = ckpt.load_streaming(str(tmp_path / "p"), jax.eval_shape(lambda: params), shardings)
    wq = loaded["transformer"]["h"]["scan_decoder"]["attention"]["wq"]["kernel"]
    assert wq.sharding == shardings["transformer"]["h"]["scan_decoder"]["attention"]["wq"]["kernel"]
    assert wq.addressable_shards[0].data.shape == (2, 4, 4)
    _assert_trees_equal(jax.device_get(loaded), params)
    with pytest.raises(ckpt.CheckpointError, match="PartitionSpec"):
        ckpt.load_streaming(str(tmp_path / "p"), jax.eval_shape(lambda: params), specs)


def test_checkpointer_metadata_retention_and_failed_save(tmp_path, train_state, monkeypatch):
    save_dir = str(tmp_path / "run")
    c = Checkpointer(save_dir, float_dtype="fp32", save_optimizer_state=True, keep=2)
    dataset_state = {"index": np.int64(7), "files": ["a.jsonl"]}
    for step in (1, 2, 3):
        c.save(step, train_state, dataset_state, metadata={"rng": jax.random.key(step)})
    c.save(3, train_state, dataset_state, milestone=True)
    c.save(3, train_state, dataset_state)               # same step again replaces it
    assert sorted(os.listdir(save_dir)) == ["milestone_00000003", "step_00000002", "step_00000003"]
    newest = latest(save_dir)
    assert newest.endswith("step_00000003")
    meta = read_metadata(os.path.join(save_dir, "step_00000002"))
    assert meta["step"] == 2 and meta["rng"] == jax.random.key_data(jax.random.key(2)).tolist()
    assert read_dataset_state(newest) == {"index": 7, "files": ["a.jsonl"]}
    assert read_dataset_state(os.path.join(newest, "dataset.pkl")) == {"index": 7, "files": ["a.jsonl"]}
    assert safe_pickle.load_path(os.path.join(newest, "metadata.pkl"))["step"] == 3
    spec = checkpoint_spec(newest)
    assert spec == f"trainstate::{newest}/streaming_train_state"
    restored, _ = ckpt.load_checkpoint(spec, train_state_target=jax.eval_shape(lambda: train_state))
    _assert_trees_equal(restored, train_state)

    # A save that fails midway (after some tensors are written) leaves the last checkpoint in place.
    calls = []

    def failing_to_bytes(x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(x))

    monkeypatch.setattr(ckpt.flax.serialization, "to_bytes", failing_to_bytes)
    with pytest.raises(RuntimeError, match="disk full"):
        c.save(4, train_state, dataset_state)
    monkeypatch.undo()
    assert latest(save_dir) == newest
    assert not any(name.startswith(".tmp") for name in os.listdir(save_dir))

    params_only = Checkpointer(str(tmp_path / "p"))                   # the original's defaults: bf16 params
    d = params_only.save(5, train_state)
    _, params = ckpt.load_checkpoint(checkpoint_spec(d))
    assert params["params"]["lm_head"]["kernel"].dtype == jnp.bfloat16


_KILLED_SAVER = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from lwm.checkpoint import formats as ckpt
    from lwm.checkpoint.manager import Checkpointer
    save_dir, flag = sys.argv[1], sys.argv[2]
    params = {"a": {"kernel": jnp.ones((64, 64))}, "b": {"kernel": jnp.full((64,), 2.0)}}
    c = Checkpointer(save_dir, float_dtype="fp32")
    c.save(1, params, {"i": 1})
    real = ckpt.flax.serialization.to_bytes
    def slow(x):
        if x.shape == (64,):          # the second tensor: signal the parent, then hang mid-file
            open(flag, "w").close()
            time.sleep(600)
        return real(x)
    ckpt.flax.serialization.to_bytes = slow
    c.save(2, {"a": {"kernel": jnp.zeros((64, 64))}, "b": {"kernel": jnp.zeros((64,))}}, {"i": 2})
""")


@pytest.mark.slow
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    save_dir, flag = str(tmp_path / "run"), str(tmp_path / "writing")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, save_dir, flag], env=env)
    try:
        deadline = time.time() + 120
        while not os.path.exists(flag):
            assert proc.poll() is None, "saver exited before reaching the second save"
            assert time.time() < deadline, "saver never reached the second save"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ".tmp-step_00000002" in os.listdir(save_dir)          # the partial save is there ...
    newest = latest(save_dir)                                    # ... and skipped
    assert newest.endswith("step_00000001")
    _, params = ckpt.load_checkpoint(checkpoint_spec(newest))
    np.testing.assert_array_equal(params["params"]["a"]["kernel"], np.ones((64, 64), np.float32))
    assert read_dataset_state(newest) == {"i": 1}
    # The next successful save clears the debris.
    Checkpointer(save_dir).save(3, {"a": {"kernel": jnp.zeros(2)}})
    assert latest(save_dir).endswith("step_00000003")
    assert not any(name.startswith(".tmp") for name in os.listdir(save_dir))


def test_orbax_round_trip_onto_another_sharding(tmp_path, train_state):
    devices = np.array(jax.devices()[:4])
    save_mesh = Mesh(devices.reshape(4), ("fsdp",))
    load_mesh = Mesh(devices.reshape(2, 2), ("fsdp", "tp"))

    def shard(tree, mesh, spec_fn):
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec_fn(x))), tree)

    rows = lambda x: P("fsdp") if np.ndim(x) and x.shape[0] % 4 == 0 else P()
    sharded = shard(train_state, save_mesh, rows)
    c = Checkpointer(str(tmp_path / "run"), save_optimizer_state=True, format="orbax")
    d = c.save(1, sharded, {"i": 0})
    spec = checkpoint_spec(d)
    assert spec.startswith("orbax::")

    cols = lambda x: NamedSharding(load_mesh, P(*([None] * (x.ndim - 1)), "tp") if x.ndim else P())
    target = jax.eval_shape(lambda: train_state)
    shardings = jax.tree.map(cols, target)
    restored, _ = ckpt.load_checkpoint(spec, train_state_target=target, train_state_shardings=shardings)
    _assert_trees_equal(jax.device_get(restored), train_state)      # orbax keeps float32: exact
    kernel = restored.params["params"]["lm_head"]["kernel"]
    assert kernel.sharding == shardings.params["params"]["lm_head"]["kernel"]

    _, params = ckpt.load_checkpoint(spec, params_target=target.params["params"])    # params only
    _assert_trees_equal(jax.device_get(params["params"]), train_state.params["params"])
    # A params-only orbax checkpoint, resumed by a loop that passes its train-state target.
    d = Checkpointer(str(tmp_path / "params_run"), format="orbax").save(2, sharded)
    state, params = ckpt.load_checkpoint(checkpoint_spec(d), train_state_target=target,
                                         train_state_shardings=shardings)
    assert state is None
    _assert_trees_equal(jax.device_get(params["params"]), train_state.params["params"])
    assert params["params"]["lm_head"]["kernel"].sharding == kernel.sharding

    bad = jax.tree.map(lambda x: x, target.params["params"])
    bad["lm_head"]["kernel"] = jax.ShapeDtypeStruct((4, 16), jnp.float32)
    with pytest.raises(ckpt.CheckpointError, match=r"params/params/lm_head/kernel: checkpoint shape"):
        ckpt.load_checkpoint(spec, params_target=bad)


_PROCESS = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lwm.checkpoint import formats as ckpt
    from lwm.checkpoint.manager import Checkpointer, checkpoint_spec
    mesh = Mesh(np.array(jax.devices()).reshape(4), ("fsdp",))          # 2 processes x 2 devices
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    tree = {"w": {"kernel": jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("fsdp")),
                                                         lambda index: x[index])}}
    target = jax.eval_shape(lambda: tree)
    by_columns = {"w": {"kernel": NamedSharding(mesh, P(None, "fsdp"))}}
    for fmt in ("orbax", "streaming"):
        d = Checkpointer(f"{root}/{fmt}", format=fmt, float_dtype="fp32").save(1, tree, {"i": 0})
        _, params = ckpt.load_checkpoint(checkpoint_spec(d), params_target=target,
                                         params_shardings=by_columns)
        kernel = params["params"]["w"]["kernel"]
        assert kernel.sharding == by_columns["w"]["kernel"] and len(kernel.addressable_shards) == 2
        for shard in kernel.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
        print(fmt, "ok", flush=True)
""")


@pytest.mark.slow
def test_two_processes_save_and_restore_onto_another_sharding(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, str(i), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "orbax ok" in out and "streaming ok" in out, out[-3000:]
    for fmt, file in (("orbax", "orbax"), ("streaming", "streaming_params")):
        assert os.listdir(tmp_path / fmt) == ["step_00000001"]        # one directory, written once
        assert os.path.exists(tmp_path / fmt / "step_00000001" / file)
