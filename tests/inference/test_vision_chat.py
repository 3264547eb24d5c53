"""lwm.vision_chat and lwm.utils.vision_io with tiny random models: frame sampling, resize/crop, the chat
template, and the entry point answering on an image and on a short video, each answer checked against a
cache-free forward pass over the prompt (with its vision tokens) and the answer."""
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lwm import vision_chat as vc
from lwm.inference import vision as iv
from lwm.utils import vision_io
from lwm.inference.loader import load_model
from lwm.text.tokenizer import load_tokenizer, train_sentencepiece
from lwm.model.vision_llama import END_OF_FRAME, END_OF_VISION, VisionLLaMAConfig

TEXTS = ["You are a helpful assistant. USER: What is in the video? <vision> </vision> ASSISTANT: A dog runs.",
         "What is in the picture? The quick brown fox jumps over the lazy dog.", "0123456789 ,.;:!?"] * 4
QUESTION = "What is in the video?"


@pytest.fixture(scope="module")
def chat_tok_path(tmp_path_factory):
    """A 400-piece tokenizer trained on the vision chat prompt (TEXTS), not the shared `tok`: the original
    template's words must be pieces of it."""
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_sentencepiece(TEXTS, path, vocab_size=400)
    return path


def _gradient(h, w, shift=0):
    """uint8 (h, w, 3): red ramps along x, green along y, blue marks the shift."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (np.arange(w)[None] * 255 // max(w - 1, 1))
    img[..., 1] = (np.arange(h)[:, None] * 255 // max(h - 1, 1))
    img[..., 2] = 40 * shift
    return img


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(_gradient(40, 64)).save(d / "picture.png")
    frames = np.stack([np.full((48, 64, 3), 30 * i + 10, np.uint8) for i in range(7)])   # brightness = index
    vision_io.write_video(str(d / "clip.mp4"), frames, fps=4)
    return d


def test_frame_indices_are_spread_evenly():
    assert vision_io.sample_frame_indices(10, 4) == [0, 3, 6, 9]
    assert vision_io.sample_frame_indices(7, 3) == [0, 3, 6]
    assert vision_io.sample_frame_indices(3, 8) == [0, 1, 2]
    with pytest.raises(ValueError, match="max_n_frames=0"):
        vision_io.sample_frame_indices(3, 0)


def test_video_frames_are_sampled_uniformly_and_cropped(media):
    frames = vision_io.load_frames(str(media / "clip.mp4"), size=32, max_n_frames=3)
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.float32
    brightness = (frames.mean(axis=(1, 2, 3)) + 1) * 127.5
    np.testing.assert_allclose(brightness, [10, 100, 190], atol=3)         # frames 0, 3, 6 of 7
    assert len(vision_io.read_video_frames(str(media / "clip.mp4"), 100)) == 7


def test_resize_and_center_crop():
    wide = _gradient(32, 64)                                   # H = size already: a pure crop, no resampling
    np.testing.assert_array_equal(vision_io.resize_center_crop(wide, 32), wide[:, 16:48])
    assert not np.array_equal(vision_io.resize_center_crop(wide, 32), wide[:, :32])   # not the left square
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    np.testing.assert_array_equal(vision_io.resize_center_crop(tall, 32), tall[16:48])
    flat = np.full((100, 180, 3), 77, np.uint8)               # resized (bicubic), then cropped
    out = vision_io.resize_center_crop(flat, 32)
    assert out.shape == (32, 32, 3) and (out == 77).all()
    np.testing.assert_array_equal(vision_io.to_uint8(vision_io.to_model_range(wide)), wide)


def test_vision_tokens_and_chat_template(chat_tok_path):
    codes = np.array([[[5, 6]], [[7, 8]]])                     # two frames of 1x2 codes
    np.testing.assert_array_equal(iv.vision_tokens(codes), [5, 6, END_OF_FRAME, 7, 8, END_OF_VISION])
    tok = load_tokenizer(chat_tok_path)
    vision = iv.vision_tokens(codes)
    p = vc.chat_prompt(tok, QUESTION, vision)
    head = [tok.bos_id] + tok.encode(f"You are a helpful assistant. USER: {QUESTION}\n") + tok.encode("<vision>")
    tail = tok.encode("</vision>") + tok.encode(" ASSISTANT:")
    np.testing.assert_array_equal(p.ids, head + list(vision) + tail)
    np.testing.assert_array_equal(p.vision, [False] * len(head) + [True] * 6 + [False] * len(tail))
    assert list(p.ids).count(tok.bos_id) == 1                 # one BOS, at the start


@functools.partial(jax.jit, static_argnames="model")
def _text_logits(params, ids, vision, model):
    return model.apply({"params": params}, ids, vision)


def _check_greedy_answer(tok_path, result, seed):
    """The answer must be the greedy continuation a cache-free forward pass gives: each answer token is
    the argmax of the text logits at the position before it. Returns the fraction of positions where it is."""
    tok = load_tokenizer(tok_path)
    config = VisionLLaMAConfig.load("tiny").replace(sample_mode="text", vocab_size=max(512, tok.vocab_size),
                                                    bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                                    initializer_range=0.1)
    model, params = load_model(config, "", jnp.float32, None, random_if_empty=True, seed=seed)   # same host-drawn weights
    prompt, answer = result["prompt"], result["tokens"]
    seq = prompt.extend(answer, False)
    logits = np.asarray(_text_logits(params, jnp.asarray(seq.ids)[None], jnp.asarray(seq.vision)[None],
                                     model=model)[0, len(prompt) - 1:])                  # (N + 1, V)
    chosen = logits[np.arange(len(answer)), answer]
    return np.mean(chosen >= logits[:len(answer), :tok.vocab_size].max(axis=1) - 1e-4)


def _chat(tok_path, input_file, *extra, stdin=None):
    return vc.main(["--load_llama_config=tiny", "--vqgan_config=tiny", f"--tokenizer={tok_path}",
                    f"--input_file={input_file}", f"--prompt={QUESTION}", "--temperature=0", "--max_new_tokens=8",
                    "--seed=5", "--update_llama_config=dict(initializer_range=0.1)", *extra], stdin=stdin)


@pytest.mark.slow
def test_chat_answers_on_an_image(chat_tok_path, media, capsys):
    result = _chat(chat_tok_path, media / "picture.png")
    out = capsys.readouterr().out
    assert f"Question: {QUESTION}\nAnswer: {result['answer']}" in out
    assert 0 < len(result["tokens"]) <= 8
    assert result["prompt"].vision.sum() == 65 and result["prompt"].ids[result["prompt"].vision][-1] == END_OF_VISION
    assert _check_greedy_answer(chat_tok_path, result, seed=5) == 1.0


@pytest.mark.slow
def test_chat_answers_on_a_short_video(chat_tok_path, media):
    result = _chat(chat_tok_path, media / "clip.mp4", "--max_n_frames=3")
    prompt = result["prompt"]
    vision = prompt.ids[prompt.vision]
    assert len(vision) == 3 * 65 and list(vision[64::65]) == [END_OF_FRAME, END_OF_FRAME, END_OF_VISION]
    assert 0 < len(result["tokens"]) <= 8
    assert _check_greedy_answer(chat_tok_path, result, seed=5) == 1.0
    # Negative control: the same check with other weights fails, so it is not passed by any answer.
    assert _check_greedy_answer(chat_tok_path, result, seed=6) < 1.0


def test_chat_budget_error_names_the_flags(chat_tok_path, media):
    from lwm.inference.sampling import PromptTooLongError

    with pytest.raises(PromptTooLongError, match="--max_new_tokens=64.*max_sequence_length=200"):
        _chat(chat_tok_path, media / "clip.mp4", "--max_n_frames=3", "--max_new_tokens=64",
              "--update_llama_config=dict(max_sequence_length=200)")
    with pytest.raises(ValueError, match="--input_file is required"):
        vc.main(["--prompt=hi"])


@pytest.mark.slow
def test_follow_up_questions_reuse_the_frames_blocks(chat_tok_path, media):
    """Two questions about one image (--interactive: the second typed): with the prefix cache (16-token blocks)
    the second question copies the first prompt's whole blocks, the image's vision tokens included, and both
    answers equal those of the same run without the cache; the follow-up's answer is also the greedy
    continuation of a cache-free forward pass over the whole conversation (checked with other weights too:
    the check can fail)."""
    small = "--update_llama_config=dict(initializer_range=0.1, decode_chunk_size=16)"

    def ask(*extra):
        return _chat(chat_tok_path, media / "picture.png", "--interactive=True", small, *extra,
                     stdin=io.StringIO("And the colour of it?\nexit\n"))["turns"]

    plain, cached = ask("--prefix_cache_mb=0"), ask("--prefix_cache_block=16")
    assert [t["tokens"] for t in cached] == [t["tokens"] for t in plain] and len(plain) == 2
    assert [t["stats"]["cached_tokens"] for t in plain] == [0, 0] and cached[0]["stats"]["cached_tokens"] == 0
    first = cached[0]["prompt"]
    last_vision = int(np.flatnonzero(first.vision)[-1])
    assert cached[1]["stats"]["cached_tokens"] == len(first) // 16 * 16 > last_vision    # the image's blocks
    follow_up = cached[1]["prompt"]
    np.testing.assert_array_equal(follow_up.ids[:len(first)], first.ids)                 # one conversation
    assert _check_greedy_answer(chat_tok_path, cached[1], seed=5) == 1.0
    assert _check_greedy_answer(chat_tok_path, cached[1], seed=6) < 1.0


def test_codes_cache_encodes_each_frame_set_once():
    class Counting:                                  # stands in for a VQGAN: codes = the frame's mean, counted
        calls = 0

        def encode(self, frames):
            Counting.calls += 1
            return None, np.asarray(frames).mean(axis=(1, 2, 3)).astype(np.int32)[:, None, None]

    cache, vq = iv.CodesCache(size=2), Counting()
    a, b, c = (np.full((2, 4, 4, 3), v, np.float32) for v in (1, 2, 3))
    np.testing.assert_array_equal(cache.codes(vq, a), [[[1]], [[1]]])
    np.testing.assert_array_equal(cache.codes(vq, a.copy()), [[[1]], [[1]]])    # same pixels, another array: hit
    assert Counting.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    cache.codes(vq, b), cache.codes(vq, c)                                       # a is evicted (size 2)
    cache.codes(vq, a)
    assert Counting.calls == 4
    cache.codes(vq, a[:1])                                                        # another shape: a miss
    assert Counting.calls == 5
