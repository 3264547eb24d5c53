"""The memory planner: exact parts (parameter counts, KV cache) against the model's own arrays, the longest
context search, bad input, and the whole estimate within 20% of XLA's compiled memory analysis."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm import memory
from lwm.llama import LLaMAConfig, LLaMAForCausalLM, init_cache
from lwm.memory import Plan, estimate, max_context, parameter_counts


@pytest.mark.parametrize("preset, tied", [("tiny", False), ("debug", True), ("7b", False)])
def test_parameter_count_and_cache_are_the_models(preset, tied):
    c = LLaMAConfig.load(preset).replace(tie_word_embeddings=tied)
    shapes = jax.eval_shape(lambda: LLaMAForCausalLM(c).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    assert sum(parameter_counts(c)) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    cache = jax.eval_shape(lambda: init_cache(c, 2, 4096, jnp.bfloat16))
    kv_bytes = sum(x.size * x.dtype.itemsize for k, x in cache.items() if k != "segment_ids")
    est = estimate(Plan(c, 4096, (1, 2, 1, 1), batch_size=2, dtype_bytes=2))["inference"]
    assert est["kv_cache"] == kv_bytes / 2            # fsdp=2: one sequence per device
    assert est["parameters"] == pytest.approx(sum(parameter_counts(c)) * 2 / 2, rel=0.01)


def test_longest_context_and_strategies():
    c = LLaMAConfig.load("7b").replace(remat_block="nothing_saveable")
    plan = Plan(c, 1024, (1, 1, 1, 8), dtype_bytes=2)
    longest = max_context(plan, 80e9)
    assert longest % 8192 == 0
    assert estimate(Plan(c, longest, (1, 1, 1, 8), dtype_bytes=2))["train"]["total"] <= 80e9
    assert estimate(Plan(c, longest + 8192, (1, 1, 1, 8), dtype_bytes=2))["train"]["total"] > 80e9
    # all_gather holds every device's K/V: more than the ring; ulysses needs heads divisible by tp*sp.
    ring, gather = (estimate(Plan(c, 2**20, (1, 1, 1, 8), dtype_bytes=2, sp_strategy=s))["train"]["total"]
                    for s in ("ring", "all_gather"))
    assert gather > ring
    with pytest.raises(ValueError, match="num_key_value_heads=32 is not divisible by tp\\*sp=64"):
        Plan(c, 2**20, (1, 1, 4, 16), sp_strategy="ulysses")


def test_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit, match="--device_memory='lots'"):
        memory.main(["--llama_config", "tiny", "--seq_len", "1024", "--device_memory", "lots"])
    with pytest.raises(SystemExit, match="--seq_len=1001 is not divisible by sp=8"):
        memory.main(["--llama_config", "tiny", "--seq_len", "1001", "--mesh_dim", "1,1,1,8"])


@pytest.mark.slow
@pytest.mark.parametrize("mode, mesh, batch", [("train", (1, 1, 1, 1), 1), ("train", (1, 2, 1, 1), 2),
                                               ("prefill", (1, 1, 1, 1), 1)])
def test_estimate_within_20_percent_of_xla(mode, mesh, batch):
    c = LLaMAConfig.load("tiny")
    plan = Plan(c, 2048, mesh, batch, 4)
    xla = (memory.xla_train if mode == "train" else memory.xla_prefill)(plan)["peak"]
    est = estimate(plan)["train" if mode == "train" else "inference"]["total"]
    assert abs(est / xla - 1) < 0.2, (est, xla)
