"""benchmarks/vision_recipe_ablation.py: its four variants really differ as claimed, in the batches lwm.train
reads (a several examples per row, each its own segment; b one segment per row over the same tokens; c uniform
token weights; d one example per row, padded) and in the flags train_lm passes; all four keep one token budget.
Seconds: no model is trained."""
import importlib.util
import os

import numpy as np
import pytest

from lwm.tools import vision_demo as vd
from lwm.training.dataset import DatasetFactory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("vision_recipe_ablation",
                                                  os.path.join(ROOT, "benchmarks", "vision_recipe_ablation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The world's records for 8 videos and 8 images, with random codes (the batches do not depend on a VQGAN)."""
    scenes = vd.train_scenes(8, 8, 0)
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 64, (s.n_frames, 8, 8)) for s in scenes]
    path = str(tmp_path_factory.mktemp("abl") / "data.jsonl")
    vd.write_json_data(path, scenes, codes, 2, 0)
    return path


def batches(ablation, variant, data, tok, n=6):
    sz = ablation.SIZES["quick"]
    ds = DatasetFactory.load_dataset(ablation.dataset_config(variant, data, sz), tok)
    it = iter(ds)
    out = [next(it)[0] for _ in range(n)]
    it.close()
    return ds, out


def rows_examples(batch, bos):
    """Examples per row, counted by their BOS inputs: a text input equal to the BOS id (a vision code may equal it)
    whose target is not the BOS id (this tokenizer's pad id is its BOS id; padding's target is padding)."""
    starts = (batch["input_tokens"] == bos) & ~batch["input_vision_masks"] & (batch["target_tokens"] != bos)
    return starts.sum(axis=1)


def test_variants_batches_differ_as_claimed(ablation, data, tok):
    got = {v: batches(ablation, v, data, tok) for v in "abcd"}
    sz = ablation.SIZES["quick"]
    for v, (ds, bs) in got.items():                      # one token budget: every batch is (B, T)
        assert all(b["input_tokens"].shape == (sz["lm_batch"], sz["lm_seq"]) for b in bs), v
    (ds_a, a), (ds_b, b), (ds_c, c), (_, d) = (got[v] for v in "abcd")
    bos = tok.bos_id
    # a: several examples in a row, each its own segment with positions from 0, weights summing to 1 per
    # example and modality; the demo's 1.0 / 0.5 modality weights
    assert max(len(np.unique(s[s > 0])) for x in a for s in x["segment_ids"]) >= 2
    for x in a:
        assert (rows_examples(x, bos) == np.array([len(np.unique(s[s > 0])) for s in x["segment_ids"]])).all()
        for r in range(x["segment_ids"].shape[0]):
            for s in np.unique(x["segment_ids"][r][x["segment_ids"][r] > 0]):
                sel = x["segment_ids"][r] == s
                assert x["position_ids"][r, sel].tolist() == list(range(sel.sum()))
                for modality in (x["target_vision_masks"][r], ~x["target_vision_masks"][r]):
                    total = x["loss_masks"][r, sel & modality].sum()
                    assert total == pytest.approx(1.0, abs=1e-5) or total == 0
    assert ds_a.loss_weights == {"text": 1.0, "vision": 0.5}
    # b: the same tokens and weights as a, but one segment per row and positions running on
    for xa, xb in zip(a, b):
        for k in ("input_tokens", "target_tokens", "loss_masks", "input_vision_masks"):
            assert (xa[k] == xb[k]).all()
        assert set(np.unique(xb["segment_ids"]).tolist()) <= {0, 1}
        for r in range(xb["segment_ids"].shape[0]):
            n = int((xb["segment_ids"][r] > 0).sum())
            assert xb["position_ids"][r, :n].tolist() == list(range(n))
    assert ds_b.loss_weights == ds_a.loss_weights
    # c: the same rows as a, every target of weight 1 (no per-example normalisation), modalities weighted 1 / 1
    for xa, xc in zip(a, c):
        assert (xa["segment_ids"] == xc["segment_ids"]).all()
        assert set(np.unique(xc["loss_masks"]).tolist()) == {0.0, 1.0}
    assert len(set(np.unique(np.concatenate([x["loss_masks"].ravel() for x in a])).tolist())) > 2   # control
    assert ds_c.loss_weights == {"text": 1.0, "vision": 1.0}
    # d: one example per row (one BOS, at column 0), no segment ids, more padding than a
    for x in d:
        assert "segment_ids" not in x
        assert (rows_examples(x, bos) == 1).all() and (x["input_tokens"][:, 0] == bos).all()
    assert np.mean([(x["loss_masks"] > 0).mean() for x in d]) < np.mean([(x["loss_masks"] > 0).mean() for x in a])


def test_train_lm_passes_each_variants_recipe(ablation, monkeypatch):
    class Stop(Exception):
        pass

    seen = {}

    def fake_run_step(cmd, env, what, job):
        seen["cmd"] = cmd
        raise Stop

    monkeypatch.setattr(vd, "run_step", fake_run_step)
    sz = ablation.SIZES["quick"]
    flags = {}
    for v in "abcd":
        with pytest.raises(Stop):
            vd.train_lm("data.jsonl", "tok.model", "/nonexistent", sz, 0, ablation.recipe(v))
        prefix = "--train_dataset.json_vision_dataset."
        flags[v] = dict(a[len(prefix):].split("=", 1) for a in seen["cmd"] if a.startswith(prefix))
    assert flags["a"]["mode"] == "pack" and flags["a"]["loss_weighting"] == "example"
    assert (flags["a"]["text_loss_weight"], flags["a"]["vision_loss_weight"]) == ("1.0", "0.5")
    assert "cross_example_attention" not in flags["a"] and flags["b"]["cross_example_attention"] == "True"
    assert flags["c"]["loss_weighting"] == "token" and flags["c"]["vision_loss_weight"] == "1.0"
    assert flags["d"]["mode"] == "pad"
    for v in "abcd":                                      # one token budget
        assert (flags[v]["seq_length"], flags[v]["batch_size"]) == (str(sz["lm_seq"]), str(sz["lm_batch"]))
    # the demo's own call is recipe a
    with pytest.raises(Stop):
        vd.train_lm("data.jsonl", "tok.model", "/nonexistent", sz, 0)
    assert dict(a[len(prefix):].split("=", 1) for a in seen["cmd"] if a.startswith(prefix)) == flags["a"]
    with pytest.raises(ValueError, match="variant 'e'"):
        ablation.recipe("e")
