"""Greedy outputs of every inference entry point on tiny models, recorded before the inference refactor
(issue 14) so that the refactored code can be shown to give the same tokens.

Regenerate (only when an output is meant to change, and say why in the commit):
    PYTHONPATH=$PWD python tests/golden/cases.py --write        # rewrites tests/golden/outputs.json
    PYTHONPATH=$PWD python tests/golden/cases.py --write NAME   # rewrites one case (names: CASES below)
tests/inference/test_golden.py runs the same cases and compares them with the file, token for token; tests import
this file as `from golden import cases` (tests/ is on their sys.path), and tests/conftest.py's `golden_workdir`
fixture is make_workdir below.

Every case runs the real entry point (`main(argv)`) with 8 simulated CPU devices (as tests/conftest.py
sets), the tiny presets, one small sentencepiece tokenizer and, for text, a tiny random checkpoint on disk
(lm_head scaled by 8 so that greedy choices are far from ties, as in tests/conftest.py's `tiny_sharp_head`);
vision models use the entry points' own seeded random weights with initializer_range=0.1 (also well separated).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))                      # tests/golden
ROOT = os.path.dirname(os.path.dirname(HERE))                           # the repository
GOLDEN = os.path.join(HERE, "outputs.json")

WORDS = ("time market people idea startup money work company reason question problem answer city number "
         "river house thing world school friend night letter garden window paper fox dog picture video").split()
TOKENIZER_TEXTS = (
    ["You are a helpful assistant. USER: hello there ASSISTANT: hi, how are you?",
     "You are a helpful assistant. USER: What is in the video? <vision> </vision> ASSISTANT: A dog runs.",
     "What is in the picture? The quick brown fox jumps over the lazy dog.",
     "Generate an image of fireworks over the city. Generate a video of a dog on a beach.",
     "The special magic number is: 0123456789 ? ASSISTANT USER"] * 4)


def setup_env() -> None:
    """The environment of the tests, set before JAX is imported: tests/conftest.py calls this, and so does
    `--write` here, so recorded and compared outputs run alike."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flag = "--xla_force_host_platform_device_count=8"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("NPROC", "32")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def documents(n_docs=6, sentences=60, seed=0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                 for _ in range(sentences)]
        docs.append(" ".join(parts) + "\n")
    return docs


def make_workdir(d: str) -> str:
    """Tokenizer, haystack JSONL, tiny text checkpoint and two media files under `d`; returns d."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from lwm.utils import vision_io
    from lwm.checkpoint.formats import save_streaming
    from lwm.model.llama import LLaMAConfig, LLaMAForCausalLM
    from lwm.text.tokenizer import train_sentencepiece

    os.makedirs(d, exist_ok=True)
    docs = documents()
    with open(os.path.join(d, "haystack.jsonl"), "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    train_sentencepiece(docs + TOKENIZER_TEXTS, os.path.join(d, "tokenizer.model"), vocab_size=400)
    model = LLaMAForCausalLM(LLaMAConfig.load("tiny"))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 8.0 if "lm_head" in jax.tree_util.keystr(p) else x, params)
    save_streaming(os.path.join(d, "params"), params)
    img = np.zeros((40, 64, 3), np.uint8)
    img[..., 0] = np.arange(64)[None] * 4
    img[..., 1] = np.arange(40)[:, None] * 6
    Image.fromarray(img).save(os.path.join(d, "picture.png"))
    frames = np.stack([np.full((48, 64, 3), 30 * i + 10, np.uint8) for i in range(5)])
    frames[:, :, :20, 2] = 200
    vision_io.write_video(os.path.join(d, "clip.mp4"), frames, fps=4)
    return d


# ------------------------------------------------------------------------------------------- the cases

def _needle_modules():
    """The needle entry points (lwm.eval_needle*, formerly scripts/eval_needle*.py)."""
    try:
        from lwm import eval_needle, eval_needle_multi
    except ImportError:
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        import eval_needle
        import eval_needle_multi
    return eval_needle, eval_needle_multi


def text_chat(d: str) -> dict:
    """Two turns of an interactive greedy chat (the second sees the first's history), then one --prompt run."""
    from lwm import text_chat as tc

    flags = ["--load_llama_config=tiny", f"--load_checkpoint=params::{d}/params", f"--tokenizer={d}/tokenizer.model",
             "--mesh_dim=1,-1,1,1", "--max_new_tokens=8", "--temperature=0"]
    out = io.StringIO()
    answers = tc.main(flags, stdin=io.StringIO("hello there\nwhat is in the picture\n"), stdout=out)
    one = tc.main(flags + ["--prompt=What is the special magic number?", "--stream=False"], stdout=io.StringIO())
    return dict(interactive=answers, transcript=out.getvalue(), prompt=one)


def needle_flags(d: str, out: str, extra=()) -> list[str]:
    """Flags of lwm.eval_needle(_multi) on make_workdir(d)'s checkpoint and haystack: 2 lengths (200, 400 tokens)
    x 2 depths, one round, 6 new tokens, results to `out`; `extra` appended."""
    return ["--load_llama_config=tiny", f"--load_checkpoint=params::{d}/params", f"--tokenizer={d}/tokenizer.model",
            f"--haystack_file={d}/haystack.jsonl", f"--output_file={out}", "--context_lengths_min=200",
            "--context_lengths_max=400", "--n_context_length_intervals=2", "--n_document_depth_intervals=2",
            "--n_rounds=1", "--max_new_tokens=6", "--final_context_length_buffer=20", "--max_tokens_per_batch=4000",
            "--progress=False", *extra]


def _json_without_timings(path: str) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.load(f)]


def eval_needle(d: str) -> list[dict]:
    single, _ = _needle_modules()
    out = os.path.join(d, "needle", "results.json")
    if os.path.exists(out):
        os.remove(out)
    single.main(needle_flags(d, out))
    return _json_without_timings(out)


def eval_needle_multi(d: str) -> list[dict]:
    _, multi = _needle_modules()
    out = os.path.join(d, "multi", "results.json")
    if os.path.exists(out):
        os.remove(out)
    multi.main(needle_flags(d, out, ["--n_needles_total=2", "--n_needles_retrieve=2",
                                      "--n_document_depth_intervals=3", "--max_new_tokens=10"]))
    return _json_without_timings(out)


def _vision_chat(d: str, input_file: str, *extra) -> dict:
    from lwm import vision_chat as vc

    result = vc.main(["--load_llama_config=tiny", "--vqgan_config=tiny", f"--tokenizer={d}/tokenizer.model",
                      f"--input_file={input_file}", "--prompt=What is in the video?", "--temperature=0",
                      "--max_new_tokens=8", "--seed=5", "--update_llama_config=dict(initializer_range=0.1)",
                      *extra])
    return dict(answer=result["answer"], tokens=[int(t) for t in result["tokens"]],
                prompt_ids=[int(t) for t in result["prompt"].ids])


def vision_chat_image(d: str) -> dict:
    return _vision_chat(d, os.path.join(d, "picture.png"))


def vision_chat_video(d: str) -> dict:
    return _vision_chat(d, os.path.join(d, "clip.mp4"), "--max_n_frames=3")


def vision_generation(d: str) -> dict:
    """A greedy two-frame video: frame 1 on the image prompt with guidance 3, frame 2 on the video prompt
    (after frame 1) with guidance 2."""
    from lwm import vision_generation as vg

    base = ["--load_llama_config=tiny", "--vqgan_config=tiny", f"--tokenizer={d}/tokenizer.model",
            "--prompt=fireworks over the city", "--seed=7", "--update_llama_config=dict(initializer_range=0.1)",
            "--temperature_image=0", "--temperature_video=0"]
    video = vg.main(base + [f"--output_file={d}/gen.mp4", "--n_frames=2", "--cfg_scale_image=3.0",
                            "--cfg_scale_video=2.0"])
    return dict(video=video["tokens"].tolist())


def _tensor_digest(arrays: dict) -> dict:
    """name -> [shape, dtype, sha256 of the bytes] for a flat dict of numpy arrays (exact, order-free)."""
    import hashlib

    import numpy as np

    out = {}
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        out[name] = [list(a.shape), str(a.dtype), hashlib.sha256(a.tobytes()).hexdigest()[:16]]
    return out


def convert(d: str) -> dict:
    """`lwm.convert to_hf` of the tiny checkpoint (fp32), then `from_hf` of that folder: the written tensors,
    config and the round-tripped checkpoint, each as exact digests."""
    from safetensors.numpy import load_file

    from lwm import convert as cv

    hf = os.path.join(d, "convert", "hf")
    back = os.path.join(d, "convert", "back")
    with contextlib.redirect_stdout(io.StringIO()):
        cv.main(["to_hf", f"--load_checkpoint=params::{d}/params", "--llama_config=tiny", f"--output_dir={hf}",
                 f"--tokenizer={d}/tokenizer.model", "--dtype=fp32"])
        cv.main(["from_hf", f"--hf_dir={hf}", f"--output=params::{back}/params", f"--config_out={back}/config.json",
                 "--dtype=fp32"])
    tensors = {}
    for name in sorted(os.listdir(hf)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(hf, name)))
    with open(os.path.join(hf, "config.json")) as f:
        hf_config = {k: v for k, v in json.load(f).items() if k != "transformers_version"}
    with open(os.path.join(back, "config.json")) as f:
        lwm_config = json.load(f)
    from lwm.checkpoint.formats import load_checkpoint

    import jax

    params = load_checkpoint(f"params::{back}/params")
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    return dict(hf_tensors=_tensor_digest(tensors), hf_config=hf_config, lwm_config=lwm_config,
                round_trip=_tensor_digest(flat))


def memory(d: str) -> dict:
    """The planner's printed tables: 7B on a 1,1,1,8 mesh at two lengths with a device size, and tiny."""
    from lwm import memory as mem

    out = {}
    for name, argv in (("7b", ["--llama_config=7b", "--seq_len=32768,131072", "--mesh_dim=1,1,1,8",
                              "--device_memory=80GB"]),
                       ("tiny", ["--llama_config=tiny", "--seq_len=2048", "--mesh_dim=1,2,1,2", "--batch_size=2",
                                 "--dtype=fp32"])):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            mem.main(argv)
        out[name] = buf.getvalue().splitlines()
    return out


def eval_long(d: str) -> dict:
    """`lwm.eval_long` on the tiny checkpoint: three tasks at two lengths, the records without timings."""
    from lwm import eval_long as el

    out = os.path.join(d, "eval_long")
    with contextlib.redirect_stdout(io.StringIO()):
        el.main(["--load_llama_config=tiny", f"--load_checkpoint=params::{d}/params",
                 f"--tokenizer={d}/tokenizer.model", f"--haystack_file={d}/haystack.jsonl",
                 "--tasks=niah_single_noise,vt,niah_multikey_essay", "--lengths=512,768", "--depths=0,100",
                 "--n_samples=1", f"--output_dir={out}", "--progress=False", "--plots=False"])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    return _strip_timings(json.loads(json.dumps(results).replace(d, "WORKDIR")))


def eval_visual_needle(d: str) -> dict:
    """`lwm.eval_visual_needle` on seeded random tiny models: the records without timings."""
    from lwm import eval_visual_needle as ev

    out = os.path.join(d, "visual_needle")
    with contextlib.redirect_stdout(io.StringIO()):
        ev.main(["--load_llama_config=tiny", "--vqgan_config=tiny", f"--tokenizer={d}/tokenizer.model",
                 "--frame_counts=2,3", "--depths=0,100", "--n_samples=1", "--max_new_tokens=4", "--seed=3",
                 "--update_llama_config=dict(initializer_range=0.1)", f"--output_dir={out}", "--progress=False"])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    return _strip_timings(json.loads(json.dumps(results).replace(d, "WORKDIR")))


def train(d: str) -> dict:
    """`lwm.train` on the tiny preset (packed JSON text, 1,2,1,4 mesh with the ring): loss, accuracy and norms
    of 4 steps, and the saved parameters' digests."""
    from lwm import train as tr

    out = os.path.join(d, "train")
    argv = ["--modality=text", "--load_llama_config=tiny", f"--tokenizer={d}/tokenizer.model",
            "--mesh_dim=1,2,1,4", "--update_llama_config=dict(attention_impl='ring', scan_query_chunk_size=16, "
            "scan_key_chunk_size=16)", "--train_dataset.type=json", "--train_dataset.text_processor.fields=text",
            f"--train_dataset.json_dataset.path={d}/haystack.jsonl", "--train_dataset.json_dataset.mode=pack",
            "--train_dataset.json_dataset.seq_length=64", "--train_dataset.json_dataset.batch_size=2",
            "--optimizer.adamw_optimizer.lr=1e-2", "--optimizer.adamw_optimizer.lr_warmup_steps=2",
            "--total_steps=4", "--log_freq=1", "--save_model_freq=4", f"--logger.output_dir={out}",
            "--logger.experiment_id=golden", "--logger.append_uuid=False", "--peak_flops=1e11", "--seed=0"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tr.main(argv)
    rows = []
    with open(os.path.join(out, "golden", "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows.append({k: r[k] for k in ("step", "loss", "accuracy", "param_norm", "gradient_norm", "learning_rate")
                         if k in r})
    return dict(metrics=rows)


TIMING_KEYS = {"seconds", "elapsed", "time", "tokens_per_second", "wall_seconds", "argv", "output_dir"}


def _strip_timings(x):
    if isinstance(x, dict):
        return {k: _strip_timings(v) for k, v in x.items() if k not in TIMING_KEYS and "second" not in k}
    if isinstance(x, list):
        return [_strip_timings(v) for v in x]
    return x


CASES = dict(text_chat=text_chat, eval_needle=eval_needle, eval_needle_multi=eval_needle_multi,
             vision_chat_image=vision_chat_image, vision_chat_video=vision_chat_video,
             vision_generation=vision_generation, convert=convert, memory=memory, eval_long=eval_long,
             eval_visual_needle=eval_visual_needle, train=train)


def load_golden() -> dict:
    with open(GOLDEN) as f:
        return json.load(f)


def main(argv) -> None:
    import tempfile

    if not argv or argv[0] != "--write" or not set(argv[1:]) <= set(CASES):
        sys.exit(__doc__)
    setup_env()
    sys.path.insert(0, ROOT)
    names = argv[1:] or list(CASES)
    outputs = load_golden() if argv[1:] else {}
    with tempfile.TemporaryDirectory() as d:
        make_workdir(d)
        outputs.update({name: json.loads(json.dumps(CASES[name](d))) for name in names})
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        json.dump(outputs, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {GOLDEN}: {', '.join(outputs)}")


if __name__ == "__main__":
    main(sys.argv[1:])
