"""Masked sequence packing, loss weights, exact resume and many-host sharding (lwm/training/packing.py, lwm/training/dataset.py)."""
import copy
import json
import pickle
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import sentence
from lwm.utils import safe_pickle
from lwm.parallel.multihost import HostShard, global_batch, host_array, host_layout, host_shard_from_mesh
from lwm.training.dataset import DatasetFactory, TextProcessor
from lwm.training.packing import Example, PackBatcher, pack_rows


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """40 lines with text (question/answer) and vision (3 codes per frame, 1-6 frames) fields."""
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({
                "question": f"{i} " + sentence(rng, 1, 12), "answer": sentence(rng, 1, 40),
                "vision": [rng.randrange(8192) for _ in range(3 * rng.randint(1, 6))],
                "fields": rng.choice(["[question],vision", "vision,answer", "[question],answer"])}) + "\n")
    return str(path)


def text_config(path, **dataset):
    return {"type": "json", "text_processor": {"fields": "[question],answer"},
            "json_dataset": {"path": path, "seq_length": 32, "batch_size": 2, **dataset}}


def vision_config(path, **dataset):
    return {"type": "json_vision",
            "vision_text_processor": {"fields_from_example": "fields", "n_tokens_per_frame": 3, "max_n_frames": 4},
            "json_vision_dataset": {"path": path, "seq_length": 32, "batch_size": 2, **dataset}}


# ---------------------------------------------------------------------------------------------- packing

def test_pack_rows_worked_example():
    a = Example.of([1, 5, 6, 2], [0, 0, 1, 1])
    b = Example.of([1, 7, 2], [0, 1, 1])
    batch = pack_rows([[a, b]], seq_length=8, pad_id=0)
    assert batch["input_tokens"].tolist() == [[1, 5, 6, 1, 7, 0, 0, 0]]
    assert batch["target_tokens"].tolist() == [[5, 6, 2, 7, 2, 0, 0, 0]]
    assert batch["loss_masks"].tolist() == [[0, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    weighted = pack_rows([[a, b]], seq_length=8, pad_id=0, loss_weighting="example")
    assert weighted["loss_masks"].tolist() == [[0, .5, .5, .5, .5, 0, 0, 0]]


def test_docstring_examples():
    import doctest

    import lwm.parallel.multihost
    import lwm.training.packing

    result = doctest.testmod(lwm.training.packing)
    assert result.attempted >= 3 and result.failed == 0
    result = doctest.testmod(lwm.parallel.multihost)      # host_layout's worked example
    assert result.attempted >= 1 and result.failed == 0


def segments(batch):
    """Yield (row, segment id, full token array, target weights, target vision masks) per packed example."""
    for r in range(batch["segment_ids"].shape[0]):
        for s in np.unique(batch["segment_ids"][r]):
            if s == 0:
                continue
            sel = batch["segment_ids"][r] == s
            idx = np.nonzero(sel)[0]
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segment not contiguous"
            assert batch["position_ids"][r, sel].tolist() == list(range(len(idx)))
            tokens = np.append(batch["input_tokens"][r, sel], batch["target_tokens"][r, idx[-1]])
            yield r, s, tokens, batch["loss_masks"][r, sel], batch["target_vision_masks"][r, sel]


@pytest.mark.parametrize("overflow", ["truncate", "split"])
def test_pack_batcher_keeps_every_example(overflow):
    rng = np.random.default_rng(0)
    seq, rows = 16, 3
    examples = []
    for i in range(60):  # example i: tokens 1000*i + 0..L-1, lengths up to 2.5 rows
        n = int(rng.integers(1, 41))
        examples.append(Example.of(1000 * i + np.arange(n), rng.integers(0, 2, n), rng.integers(0, 2, n)))
    packer = PackBatcher(rows, seq, pad_id=-1, overflow=overflow, loss_weighting="example")
    batches = []
    for ex in examples:
        packer.add(ex)
        while (b := packer.pop()) is not None:
            batches.append(b)
    pieces = {}
    for b in batches:
        assert all(v.shape == (rows, seq) for v in b.values())
        pad = b["segment_ids"] == 0
        assert (b["loss_masks"][pad] == 0).all() and (b["input_tokens"][pad] == -1).all()
        for r, s, tokens, w, tv in segments(b):
            i = tokens[0] // 1000
            pieces.setdefault(i, []).append(tokens % 1000)
            for modality in (tv, ~tv):  # example weighting: each modality's weights sum to 1 (or 0)
                assert w[modality].sum() == pytest.approx(1.0) or w[modality].sum() == 0
    stats = packer.stats()
    emitted = max(pieces)  # the last examples may still be buffered
    for i in range(emitted):
        n = len(examples[i])
        if n < 2:
            assert i not in pieces
            continue
        got = sorted(pieces[i], key=lambda p: p[0])  # first-fit may put a later piece in an earlier row
        if n - 1 <= seq:
            assert [p.tolist() for p in got] == [list(range(n))]
        elif overflow == "truncate":
            assert [p.tolist() for p in got] == [list(range(seq + 1))]
        else:  # pieces overlap by one token: every target predicted once
            assert np.concatenate([got[0]] + [p[1:] for p in got[1:]]).tolist() == list(range(n))
    long = sum(len(e) - 1 > seq for e in examples[:emitted])
    assert stats["truncated" if overflow == "truncate" else "split"] >= long > 0
    assert 0.5 < stats["packing_efficiency"] <= 1.0


def test_pad_mode_one_example_per_row(tok, data_file):
    ds = DatasetFactory.load_dataset(text_config(data_file, mode="pad"), tok)
    proc = TextProcessor({"fields": "[question],answer"}, tok)
    lines = [json.loads(line) for line in open(data_file)]
    batch, _ = next(iter(ds))
    assert "segment_ids" not in batch
    for r in range(2):  # row r holds line r alone, truncated to the row, mask shifted once
        ex = proc(lines[r])
        n = min(len(ex) - 1, 32)
        assert batch["input_tokens"][r, :n].tolist() == ex.tokens[:n].tolist()
        assert batch["target_tokens"][r, :n].tolist() == ex.tokens[1:n + 1].tolist()
        assert batch["loss_masks"][r, :n].tolist() == ex.loss_masks[1:n + 1].tolist()
        assert not batch["loss_masks"][r, n:].any()


# ------------------------------------------------------------------------ packed == alone, tiny model

def test_packed_batch_gives_each_example_its_own_loss_and_gradient(tok, data_file):
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

    cfg = text_config(data_file, mode="pack", loss_weighting="example", seq_length=128)
    batch, _ = next(iter(DatasetFactory.load_dataset(cfg, tok)))
    segs = list(segments(batch))
    e, (b, t) = len(segs), batch["input_tokens"].shape
    assert e >= 4 and max(s for _, s, *_ in segs) >= 2  # rows really hold several examples
    # Both runs use one (E, T) layout so one compiled function serves them: the packed batch gets E - B
    # empty rows (segment 0, no loss); "alone" puts example k by itself in row k, right-padded.
    packed = {k: np.zeros((e, t), v.dtype) for k, v in batch.items()}
    for k, v in batch.items():
        packed[k][:b] = v
    alone = {k: np.zeros((e, t), v.dtype) for k, v in packed.items()}
    packed_w, alone_w = np.zeros((2, e, e, t), np.float32)  # [k]: example k's loss weights
    for k, (r, s, tokens, w, _) in enumerate(segs):
        n = len(tokens) - 1
        alone["input_tokens"][k, :n], alone["target_tokens"][k, :n] = tokens[:-1], tokens[1:]
        alone["position_ids"][k] = np.arange(t)
        alone["segment_ids"][k, :n] = 1  # one example: the same as no segment ids under causal attention
        alone_w[k, k, :n] = (w > 0) / np.sum(w > 0)  # that example's own mean loss
        packed_w[k, r] = np.where(packed["segment_ids"][r] == s, packed["loss_masks"][r], 0)

    model = LLaMAForCausalLM(LLaMAConfig.load("tiny").replace(attention_impl="dense"), dtype=jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]

    def weighted_nll(p, x, w, segment_ids):  # plain log-softmax cross-entropy, weighted sum
        logits = model.apply({"params": p}, x["input_tokens"], position_ids=x["position_ids"], segment_ids=segment_ids)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), x["target_tokens"][..., None], -1)[..., 0]
        return jnp.sum(w * nll)

    loss_and_grad = jax.jit(jax.value_and_grad(weighted_nll))
    alone_losses = []
    for k in range(e):
        lp, gp = loss_and_grad(params, packed, packed_w[k], packed["segment_ids"])
        la, ga = loss_and_grad(params, alone, alone_w[k], alone["segment_ids"])
        assert abs(float(lp) - float(la)) < 1e-5, (k, float(lp), float(la))
        alone_losses.append(float(la))
        for x, y in zip(jax.tree.leaves(gp), jax.tree.leaves(ga)):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
        assert max(float(jnp.abs(y).max()) for y in jax.tree.leaves(ga)) > 1e-3  # not comparing zeros
    # the batch loss as lwm.model.loss computes it (weighted mean) is the mean of the examples' own losses
    batch_loss = float(loss_and_grad(params, packed, packed["loss_masks"], packed["segment_ids"])[0])
    assert batch_loss / packed["loss_masks"].sum() == pytest.approx(np.mean(alone_losses), abs=1e-5)
    # negative control: without segment ids, examples see their row-mates and the losses move
    leaky = jax.jit(weighted_nll, static_argnums=3)
    moved = [abs(float(leaky(params, packed, packed_w[k], None)) - alone_losses[k]) for k in range(e)]
    assert max(moved) > 1e-3


def test_cross_example_attention_drops_the_mask_and_the_default_keeps_it(tok, data_file):
    """cross_example_attention=True (naive packing, the ablation of benchmarks/vision_recipe_ablation.py): one
    segment per row, positions running on; the model then reads the row as one sequence (its loss equals the
    loss with no segment ids at all), while the default batch's masked loss does not."""
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM

    a = Example.of([1, 5, 6, 2], [0, 0, 1, 1])
    b = Example.of([1, 7, 2], [0, 1, 1])
    open_row = pack_rows([[a, b]], seq_length=8, pad_id=0, loss_weighting="example", cross_example_attention=True)
    assert open_row["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert open_row["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 0, 0]]
    masked = pack_rows([[a, b]], seq_length=8, pad_id=0, loss_weighting="example")
    for k in ("input_tokens", "target_tokens", "loss_masks", "target_vision_masks"):
        assert open_row[k].tolist() == masked[k].tolist()

    cfg = vision_config(data_file, mode="pack", loss_weighting="example", seq_length=128)
    default, _ = next(iter(DatasetFactory.load_dataset(cfg, tok)))
    cfg["json_vision_dataset"]["cross_example_attention"] = True
    naive, _ = next(iter(DatasetFactory.load_dataset(cfg, tok)))
    assert max(len(np.unique(r[r > 0])) for r in default["segment_ids"]) >= 2     # the default keeps the mask
    assert all(set(np.unique(r).tolist()) <= {0, 1} for r in naive["segment_ids"])
    assert ((naive["segment_ids"] > 0) == (default["segment_ids"] > 0)).all()
    for k in ("input_tokens", "target_tokens", "loss_masks", "input_vision_masks"):
        assert (naive[k] == default[k]).all()
    with pytest.raises(ValueError, match="cross_example_attention=True needs mode 'pack'"):
        DatasetFactory.load_dataset(vision_config(data_file, mode="pad", cross_example_attention=True), tok)

    model = LLaMAForCausalLM(LLaMAConfig.load("tiny").replace(attention_impl="dense"), dtype=jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tokens = jnp.asarray(np.where(default["input_vision_masks"], 7, default["input_tokens"]) % 256)

    @jax.jit
    def nll(x, position_ids, segment_ids, weights):
        logits = model.apply({"params": params}, tokens, position_ids=position_ids, segment_ids=segment_ids)
        targets = jnp.asarray(x % 256)
        return jnp.sum(weights * -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0])

    w = jnp.asarray(default["loss_masks"])
    one_sequence = float(nll(default["target_tokens"], None, None, w))
    assert float(nll(naive["target_tokens"], naive["position_ids"], naive["segment_ids"], w)) == pytest.approx(
        one_sequence, abs=1e-4)
    masked_loss = float(nll(default["target_tokens"], default["position_ids"], default["segment_ids"], w))
    assert abs(masked_loss - one_sequence) > 1e-3                                   # control: the mask matters


# ------------------------------------------------------------------------------------------- resume

def resumed(config, tok, n, cuts, host=None):
    """n batches, rebuilding the dataset from a pickled state (loaded with lwm.utils.safe_pickle) at each cut."""
    ds = DatasetFactory.load_dataset(config, tok, host=host)
    it, out = iter(ds), []
    for i in range(n):
        if i in cuts:
            it.close()
            state = safe_pickle.loads(pickle.dumps(ds.get_state_dict()))
            ds = DatasetFactory.load_dataset(config, tok, host=host)
            ds.load_state_dict(state)
            it = iter(ds)
        out.append(next(it))
    it.close()
    return out


# (config, whether the batcher holds examples after 10 batches: pad mode emits as soon as its rows are full; the
# vision pack holds one after 10 batches but none after 9)
@pytest.mark.parametrize("config,buffers", [
    (lambda p: text_config(p), True),                                      # the original's concatenation
    (lambda p: text_config(p, mode="pack", pack_overflow="split"), True),
    (lambda p: vision_config(p, mode="pad"), False),
    (lambda p: vision_config(p, mode="pack", loss_weighting="example", tokenizer_processes=2,
                             tokenizer_parallel_batch_size=4, tokenizer_parallel_chunk_size=2), True),
], ids=["text_no_pad", "text_pack_split", "vision_pad", "vision_pack_2proc"])
def test_resume_gives_the_uninterrupted_batches(tok, data_file, config, buffers):
    cfg, n = config(data_file), 40
    straight = resumed(cfg, tok, n, cuts=())
    again = resumed(cfg, tok, n, cuts=(1, 9, 10, 23, 31))
    assert straight[-1][1]["dataset_epoch"] >= 1  # the run crossed the end of the file
    for i, ((a, ma), (b, mb)) in enumerate(zip(straight, again)):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {i} {key}")
        assert ma["dataset_total_tokens"] == mb["dataset_total_tokens"]
        assert ma["dataset_example_index"] == mb["dataset_example_index"]
    # negative controls: a wrong state fails the comparison above (where the right one, cut at 10, passed). In
    # every mode, the state of one batch earlier; where the batcher holds examples at the cut, the file position
    # alone, without them.
    ds = DatasetFactory.load_dataset(cfg, tok)
    it = iter(ds)
    for _ in range(9):
        next(it)
    early = copy.deepcopy(ds.get_state_dict())
    next(it)
    state = ds.get_state_dict()
    it.close()

    def next_batch_is_the_11th(state):
        ds = DatasetFactory.load_dataset(cfg, tok)
        ds.load_state_dict(state)
        return np.array_equal(next(iter(ds))[0]["input_tokens"], straight[10][0]["input_tokens"])

    assert not next_batch_is_the_11th(early)
    held = state.pop("batcher")
    buffered = [ex for key in ("parts", "pending") for ex in held.get(key, [])]
    buffered += [ex for row in held.get("rows", []) for ex in row]
    assert bool(buffered) == buffers, buffered
    if buffers:
        assert not next_batch_is_the_11th(state)


def test_resume_refuses_a_different_stream(tok, data_file):
    ds = DatasetFactory.load_dataset(text_config(data_file, mode="pack"), tok)
    next(iter(ds))
    state = ds.get_state_dict()
    with pytest.raises(ValueError, match="json_dataset.seq_length=32"):
        DatasetFactory.load_dataset(text_config(data_file, mode="pack", seq_length=64), tok).load_state_dict(state)
    other_host = DatasetFactory.load_dataset(text_config(data_file, mode="pack"), tok, host=HostShard(1, 2))
    with pytest.raises(ValueError, match="host shard"):
        other_host.load_state_dict(state)


# --------------------------------------------------------------------------------------- many hosts

def test_two_data_parallel_hosts_read_disjoint_examples_covering_the_file(tok, data_file):
    proc = TextProcessor({"fields": "[question],answer"}, tok)
    line_of = {tuple(proc(json.loads(line)).tokens.tolist()): i for i, line in enumerate(open(data_file))}
    assert len(line_of) == 40
    seen = []
    for rank in range(2):
        ds = DatasetFactory.load_dataset(text_config(data_file, mode="pack", batch_size=4, seq_length=64), tok,
                                         host=HostShard(dp_rank=rank, dp_size=2))
        lines = set()
        for (batch, _), _ in zip(ds, range(30)):
            assert batch["input_tokens"].shape == (2, 64)  # this host's half of the 4 rows
            lines |= {line_of[tuple(tokens.tolist())] for *_, tokens, _, _ in segments(batch)}
        assert lines == {i for i in range(40) if i % 2 == rank}
        seen.append(lines)
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(40))


def test_sequence_parallel_hosts_take_their_columns(tok, data_file):
    full = resumed(vision_config(data_file, mode="pack"), tok, 3, cuts=())
    for sp_rank in range(2):
        part = resumed(vision_config(data_file, mode="pack"), tok, 3, cuts=(2,), host=HostShard(0, 1, sp_rank, 2))
        for (a, _), (b, _) in zip(full, part):
            for key in a:
                np.testing.assert_array_equal(a[key][:, 16 * sp_rank:16 * (sp_rank + 1)], b[key])


def test_host_layout():
    names = ("dp", "fsdp", "tp", "sp")
    # 2 hosts x 4 devices, dp=2 across hosts: each host has its own rows, all columns
    procs = np.array([0, 0, 0, 0, 1, 1, 1, 1]).reshape(2, 1, 2, 2)
    assert host_layout(names, procs, 1) == HostShard(1, 2, 0, 1)
    # sp=2 spans the hosts (fsdp=4 inside): same rows, different halves of the sequence
    procs = np.array([[0, 1]] * 4).reshape(1, 4, 1, 2)
    assert host_layout(names, procs, 0) == HostShard(0, 1, 0, 2)
    assert host_layout(names, procs, 1) == HostShard(0, 1, 1, 2)
    # 4 hosts: 2 data blocks x 2 sequence blocks
    procs = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]).reshape(2, 2, 1, 4)
    assert [host_layout(names, procs, p) for p in range(4)] == [
        HostShard(0, 2, 0, 2), HostShard(0, 2, 1, 2), HostShard(1, 2, 0, 2), HostShard(1, 2, 1, 2)]
    with pytest.raises(ValueError, match="contiguous, equal blocks"):  # interleaved rows
        host_layout(names, np.array([0, 1, 0, 1]).reshape(4, 1, 1, 1), 0)


def test_global_batch_on_the_mesh(tok, data_file):
    """Both loaders (this host's share, host_shard_from_mesh; the whole batch, host=None) give the same
    global arrays, read back by the one read-back (host_array)."""
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 1, 4), ("dp", "fsdp", "tp", "sp"))
    host = host_shard_from_mesh(mesh)
    assert host == HostShard(0, 1, 0, 1)  # one process holds every device
    batch, _ = next(iter(DatasetFactory.load_dataset(vision_config(data_file, mode="pack"), tok, host=host)))
    for out in (global_batch(batch, mesh, host), global_batch(batch, mesh, None)):
        for key, value in batch.items():
            assert out[key].sharding.spec == P(("dp", "fsdp"), "sp")
            np.testing.assert_array_equal(host_array(out[key]), value)
            assert {s.data.shape for s in out[key].addressable_shards} == {(1, 8)}
