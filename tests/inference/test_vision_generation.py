"""lwm.vision_generation with tiny random models: the entry point end to end (PNG at 256x256, MP4 with
n_frames frames), forced end-of-frame tokens, CFG scale 1 == plain sampling, every frame conditioned on the
frames before it (checked against a cache-free forward pass), and the up-front budget error."""
import functools
import json
import os

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lwm import vision_generation as vg
from lwm.inference import vision as iv
from lwm.inference.loader import load_model
from lwm.inference.sampling import PromptTooLongError
from lwm.text.tokenizer import train_sentencepiece
from lwm.model.vision_llama import END_OF_FRAME, VisionLLaMAConfig

CAPTION = "fireworks over the city"
TEXTS = [f"You are a helpful assistant. USER: Generate {w} of {c} ASSISTANT: <vision> </vision>"
         for w in ("an image", "a video") for c in (CAPTION, "a dog on a beach", "rain at night", "a red car")]
TEXTS += ["What is in the picture? The quick brown fox jumps over the lazy dog.", "0123456789 ,.;:!?"] * 4
F = 65                                                   # tiny VQGAN: 8x8 codes + end of frame


@pytest.fixture(scope="module")
def gen_tok_path(tmp_path_factory):
    """A 400-piece tokenizer trained on the generation prompts (TEXTS), not the shared `tok`: the original
    template's words must be pieces of it."""
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_sentencepiece(TEXTS, path, vocab_size=400)
    return path


@pytest.fixture(scope="module")
def gen_tok(gen_tok_path):
    """The tokenizer of gen_tok_path, loaded."""
    from lwm.text.tokenizer import load_tokenizer
    return load_tokenizer(gen_tok_path)


@pytest.fixture(scope="module")
def tiny_gen(gen_tok):
    """A tiny random vision model (sharper than the default init so greedy choices are well separated)."""
    config = VisionLLaMAConfig.load("tiny").replace(sample_mode="vision", initializer_range=0.1,
                                                    vocab_size=max(512, gen_tok.vocab_size))
    return load_model(config, "", jnp.float32, None, random_if_empty=True, seed=3)


def _flags(tok_path, out, *extra):
    return ["--load_llama_config=tiny", f"--tokenizer.vocab_file={tok_path}", f"--prompt={CAPTION}",
            f"--output_file={out}", "--seed=7", *extra]


def test_prompts_follow_the_original_template(gen_tok):
    cond, uncond = vg.generation_prompts(gen_tok, CAPTION, "image")
    assert cond.ids[0] == gen_tok.bos_id and list(cond.ids).count(gen_tok.bos_id) == 1 and not cond.vision.any()
    assert gen_tok.decode(cond.ids[1:]) == (f"You are a helpful assistant. USER: Generate an image of {CAPTION} "
                                        "ASSISTANT: <vision>")
    assert uncond.ids[0] == gen_tok.bos_id and gen_tok.decode(uncond.ids[1:]) == "<vision>"
    video, _ = vg.generation_prompts(gen_tok, CAPTION, "video")
    assert "Generate a video of" in gen_tok.decode(video.ids)
    # s = 1 gives the conditional logits bit for bit; s = 3 is uncond + 3 (cond - uncond).
    cond_l, uncond_l = jax.random.normal(jax.random.key(0), (2, 2, 50))
    np.testing.assert_array_equal(iv.guided_logits(jnp.concatenate([cond_l, uncond_l]), 1.0), cond_l)
    np.testing.assert_allclose(iv.guided_logits(jnp.concatenate([cond_l, uncond_l]), 3.0),
                               uncond_l + 3 * (cond_l - uncond_l), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def one_frame_runs(gen_tok, tiny_gen):
    """Plain, guided at s = 1 and guided at s = 3 draws of one frame, same rng, codes limited to 1000."""
    model, params = tiny_gen
    cond, uncond = vg.generation_prompts(gen_tok, CAPTION, "image")
    kw = dict(n_frames=1, tokens_per_frame=F, rng=jax.random.PRNGKey(11), pad_id=gen_tok.pad_id, num_codes=1000)
    plain = vg.generate_frames(model, params, [cond], None, sampling=vg.FrameSampling(1.0, 0, 1.0), **kw)
    at_one = vg.generate_frames(model, params, [cond], [uncond], sampling=vg.FrameSampling(1.0, 0, 1.0), **kw)
    at_three = vg.generate_frames(model, params, [cond], [uncond], sampling=vg.FrameSampling(1.0, 0, 3.0), **kw)
    return plain, at_one, at_three


def test_cfg_scale_one_equals_plain_sampling(one_frame_runs):
    plain, at_one, at_three = one_frame_runs
    assert plain.shape == (1, 1, F)
    np.testing.assert_array_equal(at_one, plain)          # both halves run, the mix is the conditional
    assert (at_three != plain).mean() > 0.5              # negative control: guidance changes the draw


def test_frames_end_with_end_of_frame_and_hold_only_codes(one_frame_runs):
    for tokens in one_frame_runs:
        assert (tokens[..., -1] == END_OF_FRAME).all()
        assert (tokens[..., :-1] >= 0).all() and (tokens[..., :-1] < 1000).all()   # num_codes=1000 respected


@functools.partial(jax.jit, static_argnames="model")
def _forward(params, ids, vision, model):
    return model.apply({"params": params}, ids, vision)


def _reference_logits(model, params, prompt, tokens):
    """Vision logits (W, len(tokens)) predicting each new token, from ONE cache-free forward pass."""
    seq = prompt.extend(tokens, True)
    logits = _forward(params, jnp.asarray(seq.ids)[None], jnp.asarray(seq.vision)[None], model=model)[0]
    return np.asarray(logits[len(prompt) - 1:-1])                                      # (N, W)


def test_every_frame_is_conditioned_on_the_frames_before_it(gen_tok, tiny_gen):
    """Greedy guided decoding of 3 frames after a video prompt holding a first frame (the entry point's
    second stage): each drawn code must be the argmax of the guided logits that a cache-free forward pass
    over prompt + all earlier tokens gives. Negative control: change the context frame -> most codes of
    the later frames are no longer the argmax."""
    model, params = tiny_gen
    first = np.concatenate([np.random.default_rng(0).integers(0, 8192, F - 1), [END_OF_FRAME]])
    video, uncond = vg.generation_prompts(gen_tok, CAPTION, "video")
    cond, uncond = video.extend(first, True), uncond.extend(first, True)
    sampling = vg.FrameSampling(temperature=0.0, top_k=0, cfg_scale=2.0)
    tokens = vg.generate_frames(model, params, [cond], [uncond], n_frames=3, tokens_per_frame=F,
                                sampling=sampling, rng=jax.random.PRNGKey(0), pad_id=gen_tok.pad_id)[0]   # (3, F)
    assert (tokens[:, -1] == END_OF_FRAME).all()
    assert (tokens[:, :-1] >= 1000).any()                 # all 8192 codes reachable (cf. num_codes above)
    flat = tokens.reshape(-1)
    free = (np.arange(flat.size) + 1) % F != 0            # positions that were drawn, not forced

    def argmax_ok(context_frame):
        c, u = video.extend(context_frame, True), vg.generation_prompts(gen_tok, CAPTION, "video")[1].extend(
            context_frame, True)
        mixed = iv.guided_logits(jnp.concatenate([_reference_logits(model, params, c, flat)[None],
                                                  _reference_logits(model, params, u, flat)[None]]), 2.0)[0]
        mixed = np.asarray(mixed)                                                        # (N, W)
        return mixed[np.arange(flat.size), flat] >= mixed[:, :8192].max(axis=1) - 1e-4

    ok = argmax_ok(first)
    assert ok[free].all(), np.flatnonzero(~ok & free)
    changed = first.copy()
    changed[:-1] = (changed[:-1] + 4096) % 8192
    ok = argmax_ok(changed)
    later = free & (np.arange(flat.size) >= F)           # frames 2 and 3 of this call
    print("not the argmax once the context frame changed:", (~ok[later]).mean())
    assert (~ok[later]).mean() > 0.5, (~ok[later]).mean()


def test_budget_is_checked_before_compiling(gen_tok_path, tmp_path):
    vg.check_budget(100, 28, 128, "x")                   # exactly full is fine
    with pytest.raises(PromptTooLongError, match="max_sequence_length=128"):
        vg.check_budget(100, 29, 128, "x")
    out = tmp_path / "long.mp4"
    with pytest.raises(PromptTooLongError, match=r"--n_frames=8.*exceeds the model's max_sequence_length=400"):
        vg.main(_flags(gen_tok_path, out, "--vqgan_config=tiny", "--n_frames=8",
                       "--update_llama_config=dict(max_sequence_length=400)"))
    assert not out.exists()
    with pytest.raises(ValueError, match="is an image but --n_frames=2"):
        vg.main(_flags(gen_tok_path, tmp_path / "x.png", "--vqgan_config=tiny", "--n_frames=2"))


@pytest.mark.slow
def test_image_entry_point_writes_a_256x256_png(gen_tok_path, tmp_path):
    """A VQGAN with the released token layout (256x256 -> 16x16 codes, 257 tokens per frame) at 1/4 of
    the released width, so that its decoder runs in seconds on a CPU."""
    vq = dict(resolution=256, hidden_channels=32, channel_mult=[1, 1, 1, 1, 1], num_res_blocks=0,
              z_channels=16, quantized_embed_dim=16)
    (tmp_path / "vq.json").write_text(json.dumps(vq))
    out = tmp_path / "fireworks.png"
    result = vg.main(_flags(gen_tok_path, out, f"--vqgan_config=json::{tmp_path / 'vq.json'}",
                            "--cfg_scale_image=5.0", "--top_k_image=8192"))
    assert result["tokens"].shape == (1, 257) and result["tokens"][0, -1] == END_OF_FRAME
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (256, 256) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), result["frames"][0])
    assert np.asarray(image).std() > 1                   # a decoded picture, not a constant


@pytest.mark.slow
def test_video_entry_point_writes_an_mp4_with_n_frames(gen_tok_path, tmp_path):
    out = tmp_path / "fireworks.mp4"
    result = vg.main(_flags(gen_tok_path, out, "--vqgan_config=tiny", "--n_frames=3", "--cfg_scale_image=3.0",
                            "--cfg_scale_video=2.0", "--top_k_video=50", "--fps=4"))
    tokens, frames = result["tokens"], result["frames"]
    assert tokens.shape == (3, F) and (tokens[:, -1] == END_OF_FRAME).all()
    assert len({tuple(t) for t in tokens}) == 3           # three different frames
    video = iio.imread(out, index=None, plugin="pyav")   # read back with imageio
    assert video.shape == (3, 32, 32, 3)
    # H.264 in yuv420p keeps luma and halves chroma resolution: compare luma, and the order of the frames.
    luma = lambda x: x.astype(float) @ np.array([0.299, 0.587, 0.114])
    psnr = lambda a, b: 10 * np.log10(255 ** 2 / np.mean((luma(a) - luma(b)) ** 2))
    assert psnr(video, frames) > 30, psnr(video, frames)
    assert psnr(video[::-1], frames) < psnr(video, frames) - 10        # negative control: wrong order
    assert os.path.getsize(out) > 0 and result["stats"]["new_tokens"] == 3 * F
