"""The prefix cache (lwm.inference.prefix_cache) through the engine: a prompt that begins with cached blocks
gives the tokens of the same prompt without a cache (fp32, greedy), for text and vision-language models, with
the cache's slot axis over sp = 2 and 4, and after evictions; the blocks are keyed by the whole prefix
(negative control: keyed by a block's own tokens, a block computed after another prefix is served and the
tokens change); LRU eviction order; one-line errors before anything compiles.

Tiny presets, 8-slot decode chunks and 16-token blocks, so a prompt of ~70 tokens spans several blocks and
several decode chunks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.inference.engine import Engine
from lwm.inference.prefix_cache import PrefixCache, block_key
from lwm.model.llama import LLaMAForCausalLM
from lwm.parallel.sharding import make_mesh, match_partition_rules, named_shardings

EOS, PAD, NEW, BLOCK = 2, 0, 8, 16
RNG = np.random.default_rng(7)
DOC = [1] + [int(x) for x in RNG.integers(3, 500, 63)]                 # 64 tokens: 4 blocks
Q1 = DOC + [int(x) for x in RNG.integers(3, 500, 5)]
Q2 = DOC + [int(x) for x in RNG.integers(3, 500, 9)]
OTHER = [1] + [int(x) for x in RNG.integers(3, 500, 15)] + DOC[16:] + Q2[64:]   # DOC's blocks 1-3 after another block 0
A_ONLY = DOC[:16] + [int(x) for x in RNG.integers(3, 500, 20)]                      # DOC's block 0, then others


@pytest.fixture(scope="module")
def setup(tiny_sharp_head):
    cfg, _, params = tiny_sharp_head
    cfg = cfg.replace(max_sequence_length=128, decode_chunk_size=8)
    engine = Engine(LLaMAForCausalLM(cfg), params, eos_id=EOS, pad_id=PAD)
    plain = {name: engine.generate([p], NEW).tokens[0] for name, p in
             (("q1", Q1), ("q2", Q2), ("other", OTHER))}
    return cfg, params, engine, plain


def _ask(engine, pc, prompts):
    """Each prompt in turn through the prefix cache: (tokens, cached tokens) per prompt."""
    out = []
    for p in prompts:
        r = engine.generate([p], NEW, prefix_cache=pc)
        out.append((r.tokens[0], r.stats["cached_tokens"]))
    return out


def test_hits_give_the_tokens_of_misses(setup):
    _, _, engine, plain = setup
    assert len({tuple(v) for v in plain.values()}) == 3          # the prompts' answers differ: the check can fail
    pc = engine.prefix_cache(1 << 24, BLOCK)
    (t1, c1), (t2, c2), (t3, c3) = _ask(engine, pc, [Q1, Q2, Q2])
    assert (t1, t2, t3) == (plain["q1"], plain["q2"], plain["q2"])
    assert c1 == 0 and c2 == 64 and c3 == 64                      # Q2's own 5th block is whole only at 80
    assert pc.hit_tokens == 128 and len(pc) == 4 + 0              # DOC's 4 blocks; Q2 (73 tokens) adds none


def test_chunked_prefill_without_a_cache_gives_the_whole_prefills_logits(setup):
    _, _, engine, _ = setup
    whole = engine.prefill(Q2)
    for chunk in (8, 24, 128):
        part = engine.prefill(Q2, chunk=chunk)
        assert part.length == len(Q2) and part.cached == 0
        np.testing.assert_allclose(np.asarray(part.logits), np.asarray(whole.logits), atol=1e-5)


def test_evictions_keep_the_tokens_and_the_budget(setup):
    _, _, engine, plain = setup
    pc = engine.prefix_cache(3 * engine.block_bytes(BLOCK), BLOCK)    # room for 3 of DOC's 4 blocks
    results = _ask(engine, pc, [Q1, OTHER, Q2, Q1])
    assert [t for t, _ in results] == [plain["q1"], plain["other"], plain["q2"], plain["q1"]]
    assert pc.evictions > 0 and len(pc) <= 3 and pc.bytes <= pc.budget_bytes


def test_lru_order():
    pc = PrefixCache(4, budget_bytes=30, block_bytes=10)
    for key in (b"a", b"b", b"c"):
        pc.put(key, {"k": key})
    assert pc.match([b"a"]) == [{"k": b"a"}]                     # a is now the most recent
    pc.put(b"d", {"k": b"d"})                                    # evicts b, the least recently used
    assert b"b" not in pc and all(k in pc for k in (b"a", b"c", b"d")) and pc.evictions == 1
    assert pc.match([b"a", b"b", b"c"]) == [{"k": b"a"}]         # the run stops at the first missing key


def test_keys_name_the_whole_prefix():
    ids = np.arange(32)
    a = PrefixCache(16, 100, 1).keys(ids)
    b = PrefixCache(16, 100, 1).keys(np.concatenate([ids[:15] + 1, ids[15:16], ids[16:]]))
    assert a[1] != b[1]                                          # same second block, different first block
    assert a[0] == block_key(b"", ids[:16], None)
    assert block_key(b"", ids[:16], np.ones(16, bool)) != a[0]   # a vision mask makes other tokens


class _OwnTokensOnly(PrefixCache):
    """Negative control: a block keyed by its own tokens only (the earlier blocks left out of the key)."""

    def key(self, previous, tokens, vision):
        return block_key(b"", tokens, vision)


def test_negative_control_a_key_without_the_earlier_blocks_serves_a_wrong_prefix(setup):
    _, _, engine, plain = setup
    pc = _OwnTokensOnly(BLOCK, 1 << 24, engine.block_bytes(BLOCK))
    (_, _), (t_other, _), (t_q2, cached) = _ask(engine, pc, [A_ONLY, OTHER, Q2])
    assert t_other == plain["other"]
    assert cached == 64                      # block 0 from A_ONLY, blocks 1-3 computed after OTHER's block 0
    assert t_q2 != plain["q2"]
    right = engine.prefix_cache(1 << 24, BLOCK)                  # the engine's keys: only block 0 is shared
    assert [c for _, c in _ask(engine, right, [A_ONLY, OTHER, Q2])] == [0, 0, 16]


@pytest.mark.parametrize("sp", [2, 4])
def test_hits_over_sp(setup, sp):
    """The cache's slots over sp (ring attention: each shard holds S / sp slots of every row, the chunks
    read through the sharded decode pass): hits give the sp = 1 tokens."""
    cfg, params, _, plain = setup
    mesh = make_mesh(f"1,1,1,{sp}", jax.devices()[:sp])
    ring = cfg.replace(attention_impl="ring")
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, named_shardings(match_partition_rules(params, ring), mesh))
        engine = Engine(LLaMAForCausalLM(ring), placed, eos_id=EOS, pad_id=PAD)
        pc = engine.prefix_cache(1 << 24, BLOCK)
        results = _ask(engine, pc, [Q1, Q2])
    assert [t for t, _ in results] == [plain["q1"], plain["q2"]] and results[1][1] == 64


def test_vision_prompts_hit_and_the_mask_is_part_of_the_key():
    from lwm.model.vision_llama import VisionLLaMAConfig, VisionLLaMAForCausalLM

    cfg = VisionLLaMAConfig.load("tiny").replace(max_sequence_length=128, decode_chunk_size=8)
    model = VisionLLaMAForCausalLM(cfg)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), bool))["params"]
    engine = Engine(model, params, eos_id=EOS, pad_id=PAD, head="text")
    video = [1] + [int(x) for x in RNG.integers(3, 200, 47)]
    mask = [False] + [True] * 47
    prompts = [video + [int(x) for x in RNG.integers(3, 200, n)] for n in (5, 7)]
    masks = [mask + [False] * (len(p) - len(video)) for p in prompts]
    plain = [engine.generate([p], NEW, vision=[m]).tokens[0] for p, m in zip(prompts, masks)]
    pc = engine.prefix_cache(1 << 24, BLOCK)
    got = [engine.generate([p], NEW, vision=[m], prefix_cache=pc) for p, m in zip(prompts, masks)]
    assert [g.tokens[0] for g in got] == plain and got[1].stats["cached_tokens"] == 48
    text_only = [False] * len(prompts[1])                       # the same ids read as text: no hit
    assert engine.generate([prompts[1]], NEW, vision=[text_only], prefix_cache=pc).stats["cached_tokens"] == 0


def test_one_line_errors_before_anything_compiles(setup):
    cfg, params, engine, _ = setup
    with pytest.raises(ValueError, match=r"--prefix_cache_mb=.*holds no block"):
        engine.prefix_cache(engine.block_bytes(BLOCK) - 1, BLOCK)
    with pytest.raises(ValueError, match=r"--prefix_cache_block=12: .*decode_chunk_size=8"):
        engine.prefix_cache(1 << 20, 12)
    dynamic = Engine(LLaMAForCausalLM(cfg.replace(rope_scaling_type="dynamic", rope_scaling_factor=2.0,
                                                  rope_original_max_position=64)),
                     params, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="rope_scaling_type='dynamic'"):
        dynamic.prefix_cache(1 << 20)
    with jax.set_mesh(make_mesh("1,1,1,2", jax.devices()[:2])):
        with pytest.raises(ValueError, match=r"--prefill_chunk=7: .*sp=2"):
            engine.check_chunking(7)


def test_int8_cache_blocks_carry_their_scales(setup):
    """An int8 cache's blocks (values and scales) reused: the tokens of the same int8 engine without a cache."""
    cfg, params, _, _ = setup
    engine = Engine(LLaMAForCausalLM(cfg), params, eos_id=EOS, pad_id=PAD, cache_dtype="int8")
    plain = [engine.generate([p], NEW).tokens[0] for p in (Q1, Q2)]
    pc = engine.prefix_cache(1 << 24, BLOCK)
    assert engine.block_bytes(BLOCK) == 2 * cfg.num_hidden_layers * cfg.kv_heads * BLOCK * (cfg.head_dim + 4)
    assert _ask(engine, pc, [Q1, Q2]) == [(plain[0], 0), (plain[1], 64)]
