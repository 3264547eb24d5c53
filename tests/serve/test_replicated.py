"""lwm.serve.replicated in one process (broadcast_bytes is then the identity, so every call still goes through the
message encoding and the registry of device values): the server over a ReplicatedEngine answers the engine's
greedy tokens; image generation (the vision path's arguments) gives the plain engine's frames; messages
round-trip bit for bit and refuse what cannot cross processes; handles are released when dropped; unreplicated
engine methods and calls after close() raise; the server with a prefix cache and small prefill chunks over a
ReplicatedEngine answers the plain engine's tokens, reports cached tokens on a request sharing a prefix, and
its chunked prefills and cache are held under ids (process 0's own copies). Two processes:
test_serve_multihost.py."""
import gc
import json

import jax
import numpy as np
import pytest

from support.serving import running_server


def test_messages_round_trip_and_refuse_what_cannot_cross():
    from lwm.inference.engine import Prefix
    from lwm.inference.sampling import SamplingConfig
    from lwm.serve.replicated import Handle, decode, encode

    args = [np.array([[1.5, np.nan], [-0.0, 3e-39]], np.float32), np.array([True, False]),
            np.arange(3, dtype=np.uint32),
            (1, 2.5, "x", None, True), {"k": [np.int64(7)]}, SamplingConfig(0.7, 5, 0.9),
            Prefix(cache=Handle(4, None), logits=Handle(5, None), length=64, position=[3, 9])]
    values = {4: "cache of 4", 5: "logits of 5"}
    back = decode(json.loads(json.dumps(encode(args))), values)
    assert back[0].dtype == np.float32 and back[0].tobytes() == args[0].tobytes()       # bit for bit
    assert back[1].dtype == bool and back[1].tolist() == [True, False] and back[2].dtype == np.uint32
    assert back[3] == (1, 2.5, "x", None, True) and back[4] == {"k": [7]} and back[5] == SamplingConfig(0.7, 5, 0.9)
    assert back[6] == Prefix(cache="cache of 4", logits="logits of 5", length=64, position=[3, 9])
    for bad in (jax.numpy.zeros(2), lambda: 0, np.array(["a"]), object()):
        with pytest.raises(TypeError, match="cannot be sent"):
            encode([bad])
    with pytest.raises(ValueError, match="released"):
        decode({"h": 99}, values)
    with pytest.raises(ValueError, match="unknown tag"):
        decode({"pickle": "..."}, values)


def test_the_server_over_a_replicated_engine_answers_the_engines_tokens(text_engine):
    from lwm.serve import create_app
    from lwm.serve.replicated import Handle, ReplicatedEngine

    engine, tok = text_engine["engine"], text_engine["tok"]
    ids = [tok.bos_id] + tok.encode("world models read long videos and text " * 5)
    want = engine.generate([ids], 6).tokens[0]
    proxy = ReplicatedEngine(engine, keepalive_s=0)
    app = create_app(proxy, tok, model_name="tiny", max_batch_size=2)
    with running_server(app) as url:
        import urllib.request

        req = urllib.request.Request(url + "/v1/completions", json.dumps(
            {"model": "tiny", "prompt": ids, "max_tokens": 6, "temperature": 0, "return_token_ids": True}).encode(),
            {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            got = json.loads(r.read())["choices"][0]["token_ids"]
    assert got == want and proxy._seq > 3                      # the scheduler's calls went through messages

    # Device values come back as handles; a dropped handle is released (here and, across hosts, everywhere)
    # with the next message.
    state = proxy.init_state(1, 128)
    assert isinstance(state, Handle) and not state.is_deleted() and state.id in proxy._values
    held, dropped = len(proxy._values), state.id
    del state
    gc.collect()
    proxy.drawn(proxy.init_state(1, 128))
    assert dropped not in proxy._values and len(proxy._values) <= held
    assert proxy.padded_length(40) == engine.padded_length(40)           # host-side attributes: the engine's
    with pytest.raises(AttributeError, match="not replicated"):
        proxy.lower_prefill
    proxy.close()
    with pytest.raises(RuntimeError, match="closed"):
        proxy.init_state(1, 128)


def test_image_generation_crosses_as_one_message(vision_engine):
    """The vision path's arguments (numpy ids and vision masks, the guided FrameRule, SamplingConfig) travel as a
    message and give the plain engine's frames; another seed gives other frames (the check can fail)."""
    from lwm.serve.model import ServedModel
    from lwm.serve.replicated import ReplicatedEngine

    engine, tok, vqgan = vision_engine["engine"], vision_engine["tok"], vision_engine["vqgan"]
    proxy = ReplicatedEngine(engine, keepalive_s=0)
    plain, replicated = (ServedModel(e, tok, "v", vqgan=vqgan) for e in (engine, proxy))
    kw = dict(temperature=1.0, top_k=0, cfg_scale=3.0)
    want = plain.generate_images("a red fox", 1, seed=3, **kw)[0]
    got = replicated.generate_images("a red fox", 1, seed=3, **kw)[0]
    assert np.array_equal(got, want) and proxy._seq == 1
    assert not np.array_equal(replicated.generate_images("a red fox", 1, seed=4, **kw)[0], want)


def test_the_prefix_cache_and_chunked_prefill_go_through_messages(text_engine):
    """The scheduler's chunked, prefix-cached path over a ReplicatedEngine: the PrefixCache is made by a
    replicated call (process 0 gets its own copy, the real object, registered under an id), each prefill is a
    RemotePrefill whose step()/result() are messages, and the tokens equal the plain engine's greedy tokens.
    Control: the first request finds nothing cached, the second (sharing one 128-token block) finds it."""
    from lwm.inference.prefix_cache import PrefixCache
    from lwm.serve import create_app
    from lwm.serve.replicated import RemotePrefill, ReplicatedEngine, encode

    engine, tok = text_engine["engine"], text_engine["tok"]
    rng = np.random.RandomState(0)
    shared = [tok.bos_id] + [int(x) for x in rng.randint(5, 390, 149)]
    prompts = [shared + [int(x) for x in np.random.RandomState(t).randint(5, 390, 6)] for t in (1, 2)]
    want = [engine.generate([p], 6).tokens[0] for p in prompts]
    proxy = ReplicatedEngine(engine, keepalive_s=0)
    block = engine.config.decode_chunk_size
    pc = proxy.prefix_cache(8 * engine.block_bytes(block), block)
    assert type(pc) is PrefixCache and proxy._values[proxy._shared[id(pc)]] is pc
    with pytest.raises(TypeError, match="cannot be sent"):          # a cache of process 0 alone is refused
        encode([engine.prefix_cache(8 * engine.block_bytes(block), block)], proxy._shared)
    app = create_app(proxy, tok, model_name="tiny", max_batch_size=2, prefix_cache=pc, prefill_chunk=32)
    got, cached = [], []
    with running_server(app) as url:
        import urllib.request

        for p in prompts:
            req = urllib.request.Request(url + "/v1/completions", json.dumps(
                {"model": "tiny", "prompt": p, "max_tokens": 6, "temperature": 0, "return_token_ids": True}).encode(),
                {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                out = json.loads(r.read())
            got.append(out["choices"][0]["token_ids"])
            cached.append(out["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert got == want and cached == [0, block], (got, want, cached)
    assert pc.stats()["blocks"] == 1 and pc.hit_tokens == block    # process 0's copy is the one that was used
    seq = proxy._seq
    cp = proxy.start_prefill(prompts[0], prefix_cache=pc, chunk=32)
    assert isinstance(cp, RemotePrefill) and cp.cached == block and cp.chunk == 32 and not cp.done
    assert cp.remaining == len(prompts[0]) - block
    cp.step()                                                   # 28 tokens left: one chunk
    assert cp.done and cp.remaining == 0 and proxy._seq == seq + 2      # one message a chunk
    prefix = cp.run()
    assert prefix.cached == block and prefix.length == len(prompts[0]) and proxy._seq == seq + 3
    assert all(proxy._values[h.id] is not None for h in (prefix.cache, prefix.logits))
    with pytest.raises(ValueError, match="not a call this server replicates"):
        proxy._call("__init__", (), {}, on=cp.id)
    proxy.close()
