"""Issue 27, training/conversion/evals: settings checked for type, range and size relations when a config is
built (one line naming the field); every failed file read names the file; output folders written aside and
renamed into place (lwm.utils.atomic), never left half old, half new. Each kind has a control that passes."""
import json
import os

import numpy as np
import pytest

from lwm.model.llama import LLaMAConfig
from lwm.model.vision_llama import VisionLLaMAConfig
from lwm.model.vqgan import VQGANConfig
from lwm.utils.atomic import replace_dir, replace_file


# ------------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("updates, field", [
    (dict(hidden_size="64"), "hidden_size"),             # type: JSON string
    (dict(hidden_size=64.0), "hidden_size"),             # type: float where an int is meant
    (dict(scan_layers=1), "scan_layers"),                # type: int where a bool is meant
    (dict(theta=float("nan")), "theta"),                 # NaN named as such
    (dict(num_hidden_layers=0), "num_hidden_layers"),    # range
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(scan_query_chunk_size=-8), "scan_query_chunk_size"),
    (dict(resid_pdrop=1.0), "resid_pdrop"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(eos_token_id=512), "eos_token_id"),            # relation: id < vocab_size (tiny: 512)
    (dict(hidden_size=60), "hidden_size"),               # relation: D % N (tiny: N = 4 -> H = 15, odd)
    (dict(num_key_value_heads=3), "num_key_value_heads"),  # relation: N % K
])
def test_llama_config_names_the_bad_field(updates, field):
    good = LLaMAConfig.load("tiny")
    good.replace(hidden_size=good.hidden_size)            # control: the valid config passes replace()
    with pytest.raises(ValueError) as e:
        good.replace(**updates)
    message = str(e.value)
    assert field in message and "\n" not in message, message


def test_every_preset_and_json_config_passes(tmp_path):
    from lwm.model.llama import PRESETS
    from lwm.model.vqgan import VQGAN_PRESETS

    for name in PRESETS:                                 # control: the shipped presets are all valid
        LLaMAConfig.load(name)
        VisionLLaMAConfig.load(name)
    for name in VQGAN_PRESETS:
        VQGANConfig.load(name)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**LLaMAConfig.load("tiny").to_dict(), "intermediate_size": "128"}))
    with pytest.raises(ValueError, match="intermediate_size='128': expected an integer"):
        LLaMAConfig.load(f"json::{path}")


@pytest.mark.parametrize("updates, field", [
    (dict(resolution=0), "resolution"), (dict(channel_mult=(1, "2")), "channel_mult"),
    (dict(num_embeddings=2.5), "num_embeddings"), (dict(dropout=-0.1), "dropout"),
])
def test_vqgan_and_vision_configs_name_the_bad_field(updates, field):
    VQGANConfig.load("tiny").replace(resolution=VQGANConfig.load("tiny").resolution)     # control
    with pytest.raises(ValueError, match=f"VQGANConfig.{field}"):
        VQGANConfig.load("tiny").replace(**updates)
    with pytest.raises(ValueError, match="VisionLLaMAConfig.sample_mode=3: expected a string"):
        VisionLLaMAConfig.load("tiny").replace(sample_mode=3)


# ------------------------------------------------------------------------------------------ files

def _hf_folder(path, n=64):
    from safetensors.numpy import save_file

    os.makedirs(path)
    save_file({"a": np.arange(n * n, dtype=np.float32).reshape(n, n)}, os.path.join(path, "model.safetensors"))
    return os.path.join(path, "model.safetensors")


def test_truncated_or_random_safetensors_names_the_file(tmp_path):
    from lwm.checkpoint.hf_folders import HFWeights

    shard = _hf_folder(str(tmp_path / "hf"))
    weights = HFWeights(str(tmp_path / "hf"))
    assert weights["a"].shape == (64, 64)                # control: the whole shard reads
    data = open(shard, "rb").read()
    for broken in (data[:len(data) // 2], os.urandom(300)):
        with open(shard, "wb") as f:
            f.write(broken)
        with pytest.raises(ValueError) as e:
            w = HFWeights(str(tmp_path / "hf"))
            [w[k] for k in w]
        assert shard in str(e.value) and "\n" not in str(e.value)


def test_config_json_not_json_names_the_file(tmp_path):
    from lwm.checkpoint.hf_folders import read_hf_config

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_bytes(b"{not json")
    with pytest.raises(ValueError, match=f"{folder / 'config.json'}: not valid JSON"):
        read_hf_config(str(folder))
    with pytest.raises(ValueError, match="c.json: not valid JSON"):
        bad = tmp_path / "c.json"
        bad.write_bytes(os.urandom(64))
        VQGANConfig.load(f"json::{bad}")


def test_random_bytes_checkpoints_and_pickles_name_the_file(tmp_path):
    import flax.serialization

    from lwm.checkpoint.formats import CheckpointError, load_checkpoint
    from lwm.checkpoint.manager import read_dataset_state

    good = tmp_path / "good.msgpack"
    good.write_bytes(flax.serialization.msgpack_serialize({"w": np.ones(3, np.float32)}))
    _, params = load_checkpoint(f"flax_params::{good}")  # control: a real file loads
    np.testing.assert_array_equal(params["params"]["w"], np.ones(3))
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(os.urandom(256))
    for kind in ("params", "flax_params", "trainstate_params"):
        with pytest.raises(CheckpointError, match=str(junk)):
            load_checkpoint(f"{kind}::{junk}")
    with pytest.raises(CheckpointError, match=f"{junk}: not a readable dataset state"):
        read_dataset_state(str(junk))


def test_binary_haystack_names_the_file(tmp_path):
    from lwm.evals.needle import iter_haystack_texts

    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"text": "a b c."}) + "\n")
    assert list(iter_haystack_texts(str(ok))) == ["a b c."]          # control
    for name in ("hay.jsonl", "hay.txt"):
        path = tmp_path / name
        path.write_bytes(b"\xff\xfe\x00" + os.urandom(500))
        with pytest.raises(ValueError, match=str(path)):
            list(iter_haystack_texts(str(path)))


# ------------------------------------------------------------------------------------------ write aside

def _tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_replace_dir_swaps_whole_and_keeps_old_on_failure(tmp_path):
    out = str(tmp_path / "out")
    with replace_dir(out) as tmp:
        open(os.path.join(tmp, "old_only.txt"), "w").write("old")
        open(os.path.join(tmp, "both.txt"), "w").write("old")
    assert _tree(out) == ["both.txt", "old_only.txt"]
    with pytest.raises(RuntimeError):
        with replace_dir(out) as tmp:                    # the writer fails midway
            open(os.path.join(tmp, "both.txt"), "w").write("new")
            raise RuntimeError("disk full")
    assert _tree(out) == ["both.txt", "old_only.txt"] and open(os.path.join(out, "both.txt")).read() == "old"
    with replace_dir(out) as tmp:
        open(os.path.join(tmp, "both.txt"), "w").write("new")
    assert _tree(out) == ["both.txt"] and open(os.path.join(out, "both.txt")).read() == "new"   # not mixed
    assert os.listdir(tmp_path) == ["out"]               # no .tmp- / .old- left behind


def test_eval_results_folder_replaced_whole(tmp_path, monkeypatch):
    from lwm.evals import report

    out = str(tmp_path / "eval")
    os.makedirs(os.path.join(out, "plots"))
    open(os.path.join(out, "plots", "stale_task.png"), "w").write("earlier run")
    open(os.path.join(out, "results.json"), "w").write("[]")
    record = dict(task="t", length=128, depth=50, score=100.0, points=[["t", 128, 50, 100.0]])
    monkeypatch.setattr(report, "summarize", lambda records, threshold: {"tasks": []})
    monkeypatch.setattr(report, "summary_table", lambda summary: "table")

    def fail(*a, **k):
        raise OSError("writer died")

    monkeypatch.setattr(report, "write_json", fail)      # the writer fails midway: the earlier result stays whole
    with pytest.raises(OSError):
        report.write_results(out, [record], {"run": 1}, plots=False)
    assert _tree(out) == ["plots/stale_task.png", "results.json"]
    monkeypatch.undo()
    monkeypatch.setattr(report, "summarize", lambda records, threshold: {"tasks": []})
    monkeypatch.setattr(report, "summary_table", lambda summary: "table")
    report.write_results(out, [record], {"run": 2}, plots=False)
    assert _tree(out) == ["results.json", "summary.md"]  # the stale plot of the earlier run is gone
    assert json.load(open(os.path.join(out, "results.json")))["run"] == {"run": 2}


def test_replace_file_keeps_old_on_failure(tmp_path):
    path = str(tmp_path / "summary.json")
    open(path, "w").write('{"old": 1}')
    with pytest.raises(RuntimeError):
        with replace_file(path) as tmp:                  # the writer dies after writing half
            open(tmp, "w").write('{"ne')
            raise RuntimeError("killed")
    assert open(path).read() == '{"old": 1}' and os.listdir(tmp_path) == ["summary.json"]
    with pytest.raises(RuntimeError):                    # control: writing the file in place leaves it torn
        with open(path, "w") as f:
            f.write('{"ne')
            raise RuntimeError("killed")
    assert open(path).read() == '{"ne'
    with replace_file(path) as tmp:
        open(tmp, "w").write('{"new": 2}')
    assert open(path).read() == '{"new": 2}' and os.listdir(tmp_path) == ["summary.json"]
    with pytest.raises(ValueError, match="is a folder"):
        with replace_file(str(tmp_path)):
            pass


def test_heatmap_and_json_written_aside(tmp_path, monkeypatch):
    """lwm.evals.report.plot_task (the eval_needle heatmap) and write_json (needle results, the demo's
    summary.json): a writer dying midway leaves the earlier file whole; a clean write replaces it."""
    import matplotlib.figure

    from lwm.evals import report

    record = dict(task="needle", length=128, depth=50, score=100.0, points=[["needle", 128, 50, 100.0]])
    png, js = str(tmp_path / "needle.png"), str(tmp_path / "results.json")
    report.plot_task([record], "needle", png)
    report.write_json(js, [record])
    good_png, good_js = open(png, "rb").read(), open(js).read()
    assert good_png.startswith(b"\x89PNG") and json.loads(good_js) == [record]

    def torn_savefig(self, fname, **kwargs):
        open(fname, "wb").write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn_savefig)
    with pytest.raises(OSError):
        report.plot_task([record], "needle", png)
    assert open(png, "rb").read() == good_png
    monkeypatch.setattr(json, "dump", lambda obj, f, **k: (f.write("[{"), (_ for _ in ()).throw(OSError("full"))))
    with pytest.raises(OSError):
        report.write_json(js, [dict(record, score=0.0)])
    assert open(js).read() == good_js
    assert sorted(os.listdir(tmp_path)) == ["needle.png", "results.json"]       # no .tmp- left behind
    monkeypatch.undo()
    report.write_json(js, [dict(record, score=0.0)])
    assert json.loads(open(js).read())[0]["score"] == 0.0


# ------------------------------------------------------------------------- readers read what they need

class _Counting:
    """A binary file object that counts the bytes handed out (read, readline, iteration)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def _count(self, data):
        self.n += len(data)
        return data

    def read(self, *a):
        return self._count(self.f.read(*a))

    def readline(self, *a):
        return self._count(self.f.readline(*a))

    def __iter__(self):
        return (self._count(line) for line in self.f)

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """A 50 MB JSONL file of 50,000 one-KB documents."""
    path = tmp_path_factory.mktemp("big") / "haystack.jsonl"
    line = (json.dumps({"text": "word " * 200}) + "\n").encode()
    with open(path, "wb") as f:
        f.write(line * (50 * 1024 * 1024 // len(line)))
    assert os.path.getsize(path) > 49 * 1024 * 1024
    return str(path)


def _count_reads(monkeypatch):
    import fsspec

    opened = []
    real = fsspec.open

    def counting_open(path, mode="rb", **kwargs):
        assert mode == "rb", mode
        opened.append(_Counting(open(path, "rb")))
        return opened[-1]

    monkeypatch.setattr(fsspec, "open", counting_open)
    return opened, real


class _WordTokenizer:
    def encode(self, text):
        return [1] * len(text.split())


def test_needle_haystack_reader_stops_after_what_it_needs(big_jsonl, monkeypatch):
    from lwm.evals import needle

    opened, _ = _count_reads(monkeypatch)
    streams = needle.read_haystacks(big_jsonl, n_rounds=2, min_tokens=1000, tokenizer=_WordTokenizer())
    assert [len(s) for s in streams] == [1000, 1000]          # 5 documents of 200 words per round
    assert opened[0].n < 64 * 1024, opened[0].n               # of 50 MB
    # Control: the counter sees a reader that needs the whole file.
    opened.clear()
    with pytest.raises(ValueError, match="ran out of text"):
        needle.read_haystacks(big_jsonl, n_rounds=1, min_tokens=10 ** 9, tokenizer=_WordTokenizer())
    assert opened[0].n == os.path.getsize(big_jsonl)


def test_training_json_reader_stops_after_what_it_needs(big_jsonl, monkeypatch):
    import itertools

    from lwm.parallel.multihost import HostShard
    from lwm.training import data_sources

    opened, _ = _count_reads(monkeypatch)
    records = data_sources.json_records(big_jsonl, lambda example, index: len(example["text"]), "test", 0, 0, 0,
                                        HostShard())
    got = list(itertools.islice(records, 10))
    assert [r[:2] for r in got] == [("ok", 1000)] * 10
    assert opened[0].n < 64 * 1024, opened[0].n
    more = list(itertools.islice(records, 20000))             # control: reading on reads on
    assert len(more) == 20000 and opened[0].n > 20000 * 1000


@pytest.mark.parametrize("flag, value", [
    ("optimizer.adamw_optimizer.lr", float("nan")), ("optimizer.adamw_optimizer.lr", -1e-3),
    ("optimizer.adamw_optimizer.b2", 1.0), ("optimizer.accumulate_gradient_steps", 0),
    ("train_dataset.json_dataset.seq_length", 0), ("eval_dataset.json_dataset.batch_size", -2),
])
def test_training_check_config_names_the_flag(flag, value):
    from lwm.cli.flags import FlagError
    from lwm.train import get_default_config
    from lwm.training.loop import check_config

    check_config(get_default_config())                   # control: the defaults pass
    config = get_default_config()
    node, _, leaf = flag.rpartition(".")
    target = config
    for part in node.split("."):
        target = target[part]
    target[leaf] = value
    with pytest.raises(FlagError, match=f"--{flag}="):
        check_config(config)


@pytest.fixture(scope="module")
def big_txt(tmp_path_factory):
    """A 50 MB plain-text haystack: 500,000 lines of 100 bytes."""
    path = tmp_path_factory.mktemp("bigtxt") / "haystack.txt"
    line = ("Word " * 19 + "end.\n").encode()
    assert len(line) == 100
    with open(path, "wb") as f:
        f.write(line * 500_000)
    return str(path)


def test_txt_haystack_readers_stop_after_what_they_need(big_txt, monkeypatch):
    from lwm.evals import needle
    from lwm.evals.haystack import essay_haystack

    opened, _ = _count_reads(monkeypatch)
    streams = needle.read_haystacks(big_txt, n_rounds=2, min_tokens=1000, tokenizer=_WordTokenizer())
    assert [len(s) >= 1000 for s in streams] == [True, True]
    assert opened[0].n <= 2 * needle.TXT_BLOCK_BYTES, opened[0].n       # 2 blocks of a 50 MB file
    opened.clear()
    hay = essay_haystack(big_txt, max_chars=3_000_000)
    assert opened[0].n <= 4 * needle.TXT_BLOCK_BYTES and len(hay) == 3 * needle.TXT_BLOCK_BYTES // 100
    # Control: without a bound that cuts it, the whole file is read.
    opened.clear()
    assert len(essay_haystack(big_txt, max_chars=10 ** 9)) == 500_000
    assert opened[0].n == os.path.getsize(big_txt)


def test_txt_blocks_never_split_a_character(tmp_path, monkeypatch):
    from lwm.evals import needle

    monkeypatch.setattr(needle, "TXT_BLOCK_BYTES", 7)
    text = "héllo 你好世界\nab\n" + "日本語のテキスト" * 5
    path = tmp_path / "h.txt"
    path.write_text(text, encoding="utf-8")
    blocks = list(needle.iter_haystack_texts(str(path)))
    assert "".join(blocks) == text and len(blocks) > 5
    assert all("\ufffd" not in b for b in blocks)


def test_a_checkpoint_folder_names_the_file_to_give(tmp_path):
    from lwm.checkpoint.formats import CheckpointError, load_checkpoint

    step = tmp_path / "step_00000200"
    step.mkdir()
    (step / "streaming_train_state").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(f"trainstate_params::{step}")
    assert str(e.value).endswith(f"is a folder; give the file inside it: trainstate_params::{step}/streaming_train_state")
    with pytest.raises(CheckpointError, match=f"it holds a train state: trainstate_params::{step}/streaming_train_state"):
        load_checkpoint(f"params::{step}")
    (step / "streaming_params").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"give the file inside it: params::{step}/streaming_params"):
        load_checkpoint(f"params::{step}")
    # Control: the file itself is read (an empty streaming file holds no tensors), not refused as a folder.
    _, params = load_checkpoint(f"params::{step}/streaming_params")
    assert params == {"params": {}}
