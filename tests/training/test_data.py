"""Tokenizer, field syntax, the original's JSON text batches, and bad input (lwm/text/tokenizer.py, lwm/training/dataset.py)."""
import json
import logging
import pickle
import random

import numpy as np
import pytest

from support import sentence
from lwm.training.dataset import DataFormatError, DatasetFactory, TextProcessor, VisionTextProcessor
from lwm.text.tokenizer import get_tokenizer_config, load_tokenizer


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    """60 question/answer lines, one malformed (line 8) and one blank (line 15)."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            f.write(json.dumps({"question": sentence(rng), "answer": sentence(rng, 1, 60)}) + "\n")
            if i == 6:
                f.write('{"question": "unterminated\n')
            if i == 12:
                f.write("\n")
    return str(path)


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return str(path)


# ------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_layout_and_loading(tok, tmp_path):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (400, 1, 2, 1)  # support.small_tokenizer: 400
    assert tok._sp.unk_id() == 0 and tok._sp.get_piece_size() == tok.vocab_size
    text = "the quick  fox\n reads über-long videos 123"
    ids = tok.encode(text)
    assert ids and tok.bos_id not in ids and tok.eos_id not in ids  # encode adds no special tokens
    assert tok.decode(ids) == text  # byte fallback: lossless, whitespace kept
    path = tok.source
    for spec in (path, {"vocab_file": path}, get_tokenizer_config({"vocab_file": path})):  # file, flag style
        assert load_tokenizer(spec).encode(text) == ids
    d = tmp_path / "tokdir"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(open(path, "rb").read())
    assert load_tokenizer(str(d)).encode(text) == ids
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids  # worker processes get a copy
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing" / "tokenizer.model"))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        load_tokenizer("lwm-test-nonexistent-org/nonexistent-model")
    with pytest.raises(ValueError, match="vocab_file is empty"):
        load_tokenizer({"vocab_file": ""})
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        load_tokenizer(str(bad))


def test_hf_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            add_bos_token=True).save_pretrained(tmp_path)
    hf = load_tokenizer(str(tmp_path))
    assert type(hf).__name__ == "HFTokenizer"
    assert hf.encode("hello world hello") == [3, 4, 3]  # no BOS even though the tokenizer would add one
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (1, 2, 1, 5)


# --------------------------------------------------------------------------------------- field syntax

def test_text_fields_worked_examples(tok):
    q, a, b = "the quick fox", "jumps over", "a lazy dog"
    ex = {"q": q, "a": a, "b": b, "spec": "[q],<|eos|>,a"}
    enc = tok.encode
    t = TextProcessor({"fields": "[q],a"}, tok)(ex)
    assert t.tokens.tolist() == [1, *enc(q), *enc(a), 2]
    assert t.loss_masks.tolist() == [0] + [0] * len(enc(q)) + [1] * len(enc(a)) + [1]
    assert not t.vision_masks.any()
    # a+b joins with the separator; prepend_text goes before the first field only
    t = TextProcessor({"fields": "[q],a+b", "subfield_separator": " | ", "prepend_text": "USER: "}, tok)(ex)
    assert t.tokens.tolist() == [1, *enc("USER: " + q), *enc(a + " | " + b), 2]
    # <|bos|> / <|eos|> markers carry the field's loss; [<|eos|>] none; no BOS/EOS around the example
    t = TextProcessor({"fields": "a,[<|eos|>],<|bos|>,[b]", "add_bos_token": False, "add_eos_token": False}, tok)(ex)
    assert t.tokens.tolist() == [*enc(a), 2, 1, *enc(b)]
    assert t.loss_masks.tolist() == [1] * len(enc(a)) + [0, 1] + [0] * len(enc(b))
    # fields_from_example; a marker in field 0 means prepend_text is not used (as in the original)
    t = TextProcessor({"fields_from_example": "spec", "prepend_text": "X"}, tok)(ex)
    assert t.tokens.tolist() == [1, *enc("X" + q), 2, *enc(a), 2]
    assert t.loss_masks.tolist() == [0] * (1 + len(enc("X" + q))) + [1] * (len(enc(a)) + 2)
    t = TextProcessor({"fields": "<|bos|>,a", "prepend_text": "X", "add_bos_token": False}, tok)(ex)
    assert t.tokens.tolist() == [1, *enc(a), 2]
    with pytest.raises(ValueError, match="fields"):
        TextProcessor({}, tok)
    with pytest.raises(KeyError, match="text_processor.feilds"):
        TextProcessor({"feilds": "a"}, tok)


def test_vision_fields(tok):
    per = 4
    frames = [[10 * f + j for j in range(per)] for f in range(5)]
    ex = {"cap": "the fox", "vision": sum(frames[:2], []), "fields": "[cap],vision"}
    p = VisionTextProcessor({"fields_from_example": "fields", "n_tokens_per_frame": per}, tok)
    t = p(ex, index=3)
    start, end, cap = tok.encode("<vision>"), tok.encode("</vision>"), tok.encode("the fox")
    codes = frames[0] + [8192] + frames[1] + [8193]
    assert t.tokens.tolist() == [1, *cap, *start, *codes, *end, 2]  # markers without a BOS in front
    assert t.vision_masks.tolist() == [False] * (1 + len(cap) + len(start)) + [True] * len(codes) + [False] * (len(end) + 1)
    assert t.loss_masks.tolist() == [0.0] * (1 + len(cap)) + [1.0] * (len(start) + len(codes) + len(end) + 1)
    # uniform frame subsampling: 5 frames -> 3 keeps frames 0, 2, 4
    p3 = VisionTextProcessor({"fields_from_example": "fields", "n_tokens_per_frame": per, "max_n_frames": 3}, tok)
    t = p3({**ex, "vision": sum(frames, []), "fields": "vision"}, 0)
    vis = t.tokens[t.vision_masks].tolist()
    assert vis == frames[0] + [8192] + frames[2] + [8192] + frames[4] + [8193]
    # a list of field strings: fields_index picks one, otherwise Random(line index) does
    many = {**ex, "fields": ["vision", "[cap],vision", "cap"]}
    pick = VisionTextProcessor({"fields_from_example": "fields", "n_tokens_per_frame": per, "fields_index": 2}, tok)
    assert pick(many, 0).tokens.tolist() == [1, *cap, 2]
    for index in range(5):
        chosen = random.Random(index).choice(many["fields"])
        assert p(many, index).tokens.tolist() == p({**ex, "fields": chosen}, index).tokens.tolist()
    with pytest.raises(DataFormatError, match=r"vision field 'vision' has 7 tokens, not a positive multiple of n_tokens_per_frame=4"):
        p({**ex, "vision": list(range(7))})


# ------------------------------------------------------------------------- the original's text batches

def original_text_batches(path, tok, fields, seq_length, batch_size, n_batches):
    """Independent re-statement of the original JsonDataset/TextProcessor (no_pad): parse each line
    (skipping bad ones), BOS + fields + EOS, concatenate the token and loss-mask streams, cut chunks of
    batch_size * seq_length (inputs), the same shifted by one (targets, loss masks), keep the rest."""
    chunk = batch_size * seq_length
    tokens, masks, out = [], [], []
    while True:  # epochs: the original starts over at EOF
        for line in open(path):
            try:
                ex = json.loads(line)
            except json.JSONDecodeError:
                continue
            tokens.append(tok.bos_id), masks.append(0.0)
            for field in fields.split(","):
                m = 0.0 if field.startswith("[") else 1.0
                ids = tok.encode(ex[field.strip("[]")])
                tokens.extend(ids), masks.extend([m] * len(ids))
            tokens.append(tok.eos_id), masks.append(1.0)
            while len(tokens) > chunk + 1:
                out.append((np.array(tokens[:chunk]).reshape(batch_size, -1),
                            np.array(tokens[1:chunk + 1]).reshape(batch_size, -1),
                            np.array(masks[1:chunk + 1]).reshape(batch_size, -1)))
                if len(out) == n_batches:
                    return out
                tokens, masks = tokens[chunk:], masks[chunk:]


@pytest.mark.parametrize("processes", [1, 2])
def test_json_text_matches_original(tok, qa_file, processes):
    n = 24  # > one epoch of the file (about 5000 tokens)
    want = original_text_batches(qa_file, tok, "[question],answer", 64, 4, n)
    ds = DatasetFactory.load_dataset({
        "type": "json", "text_processor": {"fields": "[question],answer"},
        "json_dataset": {"path": qa_file, "seq_length": 64, "batch_size": 4, "tokenizer_processes": processes,
                         "tokenizer_parallel_batch_size": 8, "tokenizer_parallel_chunk_size": 2}}, tok)
    got = [b for b, _ in zip(ds, range(n))]
    assert got[-1][1]["dataset_epoch"] >= 1
    for (batch, metrics), (inp, tgt, mask) in zip(got, want):
        np.testing.assert_array_equal(batch["input_tokens"], inp)
        np.testing.assert_array_equal(batch["target_tokens"], tgt)
        np.testing.assert_array_equal(batch["loss_masks"], mask)
        assert not batch["input_vision_masks"].any() and not batch["target_vision_masks"].any()
    m = got[-1][1]
    assert m["dataset_total_tokens"] == n * 4 * 64
    assert m["dataset_malformed_lines"] == m["dataset_epoch"] + (m["dataset_example_index"] >= 7)  # line 8
    assert m["dataset_accumulated_tps"] > 0 and m["dataset_average_tps"] > 0


def test_start_position_options(tok, qa_file):
    """start_seek_loc / example_index_at_start start a fresh run at a line; tokens_count_at_start the count."""
    lines = open(qa_file, "rb").readlines()
    k = 20
    cfg = {"type": "json", "text_processor": {"fields": "[question],answer"},
           "json_dataset": {"path": qa_file, "seq_length": 512, "batch_size": 2, "mode": "pad",
                            "start_seek_loc": sum(map(len, lines[:k])), "example_index_at_start": k,
                            "tokens_count_at_start": 1000}}
    batch, metrics = next(iter(DatasetFactory.load_dataset(cfg, tok)))
    proc = TextProcessor({"fields": "[question],answer"}, tok)
    for row, line in enumerate(lines[k:k + 2]):
        ex = proc(json.loads(line))
        assert batch["target_tokens"][row, :len(ex) - 1].tolist() == ex.tokens[1:].tolist()
    assert metrics["dataset_example_index"] == k + 1 and metrics["dataset_total_tokens"] == 1000 + 2 * 512


def test_vision_no_pad_is_the_concatenated_stream(tok, tmp_path):
    rng = random.Random(4)
    lines = [json.dumps({"cap": sentence(rng), "vision": [rng.randrange(8192) for _ in range(8 * rng.randint(1, 3))],
                         "fields": rng.choice(["[cap],vision", "vision,cap"])}) for _ in range(12)]
    path = write_lines(tmp_path / "v.jsonl", lines)
    proc_cfg = {"fields_from_example": "fields", "n_tokens_per_frame": 8}
    ds = DatasetFactory.load_dataset({"type": "json_vision", "vision_text_processor": proc_cfg,
                                      "json_vision_dataset": {"path": path, "seq_length": 16, "batch_size": 2,
                                                              "mode": "no_pad"}}, tok)
    proc = VisionTextProcessor(proc_cfg, tok)
    exs = [proc(json.loads(line), i) for i, line in enumerate(lines)]
    tokens, masks, vision = (np.concatenate([getattr(e, f) for e in exs]) for f in ("tokens", "loss_masks", "vision_masks"))
    for i, (batch, _) in zip(range(len(tokens) // 32 - 1), ds):
        cut = slice(32 * i, 32 * i + 32)
        nxt = slice(32 * i + 1, 32 * i + 33)
        np.testing.assert_array_equal(batch["input_tokens"].ravel(), tokens[cut])
        np.testing.assert_array_equal(batch["target_tokens"].ravel(), tokens[nxt])
        np.testing.assert_array_equal(batch["loss_masks"].ravel(), masks[nxt])
        np.testing.assert_array_equal(batch["input_vision_masks"].ravel(), vision[cut])
        np.testing.assert_array_equal(batch["target_vision_masks"].ravel(), vision[nxt])
    assert vision.any() and (~vision).any()


def test_huggingface_local_file_matches_json(tok, tmp_path):
    rng = random.Random(2)
    path = write_lines(tmp_path / "hf.jsonl", [json.dumps({"question": sentence(rng), "answer": sentence(rng)})
                                               for _ in range(30)])
    common = {"text_processor": {"fields": "[question],answer"}}
    sizes = {"path": path, "seq_length": 16, "batch_size": 2}
    js = DatasetFactory.load_dataset({**common, "type": "json", "json_dataset": sizes}, tok)
    hf = DatasetFactory.load_dataset({**common, "type": "huggingface", "huggingface_dataset": {**sizes, "streaming": True}}, tok)
    want = [b for (b, _), _ in zip(js, range(8))]
    it = iter(hf)
    got = [next(it)[0] for _ in range(3)]
    hf2 = DatasetFactory.load_dataset({**common, "type": "huggingface", "huggingface_dataset": {**sizes, "streaming": True}}, tok)
    hf2.load_state_dict(pickle.loads(pickle.dumps(hf.get_state_dict())))
    got += [b for (b, _), _ in zip(hf2, range(5))]  # resumed
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_array_equal(g[key], w[key])


# ------------------------------------------------------------------------------------------ bad input

def _json_ds(tok, path, **kw):
    cfg = {"type": "json", "text_processor": {"fields": "[question],answer"},
           "json_dataset": {"path": path, "seq_length": 8, "batch_size": 1, **kw}}
    return DatasetFactory.load_dataset(cfg, tok)


def test_malformed_line_is_skipped_counted_and_reported(tok, tmp_path, caplog):
    good = json.dumps({"question": "the fox", "answer": "jumps over a lazy dog " * 3})
    path = write_lines(tmp_path / "d.jsonl", [good, "{not json", "[1, 2]", b'{"question": "\xff"}', good])
    with caplog.at_level(logging.WARNING, logger="lwm.training.dataset"):
        batches = [m for (_, m), _ in zip(_json_ds(tok, path, mode="pad"), range(2))]
    assert batches[-1]["dataset_malformed_lines"] == 3
    assert batches[-1]["dataset_examples"] == 2
    text = caplog.text
    assert "d.jsonl, line 2: skipped malformed" in text and "line 3: skipped" in text and "JSON object" in text
    assert "line 4: skipped" in text


def test_bad_input_errors(tok, tmp_path):
    good = json.dumps({"question": "the fox", "answer": "jumps"})
    missing = write_lines(tmp_path / "m.jsonl", [good, good, json.dumps({"question": "q"})])
    for processes in (1, 2):  # also raised from a worker process
        with pytest.raises(DataFormatError, match=r"m.jsonl, line 3: missing field 'answer'"):
            for _ in _json_ds(tok, missing, tokenizer_processes=processes):
                pass
    with pytest.raises(FileNotFoundError, match="json_dataset.path=.*no such file"):
        _json_ds(tok, str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="the file is empty"):
        _json_ds(tok, str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="unknown dataset type 'jsonl'"):
        DatasetFactory.load_dataset({"type": "jsonl"}, tok)
    with pytest.raises(KeyError, match="json_dataset.seq_len"):
        DatasetFactory.get_default_config({"json_dataset": {"seq_len": 4}})
    with pytest.raises(ValueError, match="mode='packed'"):
        _json_ds(tok, missing, mode="packed")
    with pytest.raises(ValueError, match="loss_weighting='example' needs mode"):
        _json_ds(tok, missing, loss_weighting="example")
    vis = write_lines(tmp_path / "v.jsonl", [json.dumps({"fields": "vision", "vision": list(range(512))}),
                                             json.dumps({"fields": "vision", "vision": list(range(300))})])
    ds = DatasetFactory.load_dataset({"type": "json_vision", "vision_text_processor": {"fields_from_example": "fields"},
                                      "json_vision_dataset": {"path": vis, "seq_length": 64, "batch_size": 1}}, tok)
    with pytest.raises(DataFormatError, match=r"v.jsonl, line 2: vision field 'vision' has 300 tokens"):
        for _ in ds:
            pass


@pytest.mark.parametrize("lines, mode, match", [
    (["{bad", "", "[]"], "no_pad", "no usable example"),                   # only malformed/blank lines
    ([json.dumps({"question": "", "answer": ""})], "pack", "fewer than 2 tokens"),  # nothing to predict
])
def test_no_usable_example_stops(tok, tmp_path, lines, mode, match):
    path = write_lines(tmp_path / "u.jsonl", lines)
    kw = {"mode": mode}
    if mode == "pack":
        with pytest.raises(ValueError, match=match):
            next(iter(DatasetFactory.load_dataset({
                "type": "json", "text_processor": {"fields": "question,answer", "add_bos_token": False,
                                                   "add_eos_token": False},
                "json_dataset": {"path": path, "seq_length": 8, "batch_size": 1, **kw}}, tok)))
    else:
        with pytest.raises(ValueError, match=match):
            next(iter(_json_ds(tok, path, **kw)))


def test_no_line_for_this_host_stops(tok, tmp_path):
    from lwm.parallel.multihost import HostShard

    path = write_lines(tmp_path / "one.jsonl", [json.dumps({"question": "the fox", "answer": "jumps"})])
    cfg = {"type": "json", "text_processor": {"fields": "question,answer"},
           "json_dataset": {"path": path, "seq_length": 8, "batch_size": 2}}
    with pytest.raises(ValueError, match="no line for data-parallel rank 1 of 2"):
        next(iter(DatasetFactory.load_dataset(cfg, tok, host=HostShard(dp_rank=1, dp_size=2))))
