"""`lwm.serve` with a vision-language model (tiny preset, random weights, tiny VQGAN) and the `openai` client:
an image sent as a PNG or JPEG data URL, frames as several image parts, and an mp4 data URL are each answered
with the tokens the engine gives for the original LWM-Chat prompt (`lwm.text.chat_template.vision_chat_prompt`)
of those pixels' VQGAN codes (the JPEG's and the mp4's pixels as decoded); non-image data in an image part is a
400 and the next request is served; local paths need --allow_local_media; /v1/images/generations returns a PNG equal to the direct generation."""
import base64
import io

import numpy as np
import pytest

from support.needs import import_or_fail
from support.serving import running_server

openai = import_or_fail("openai", 'pip install -e ".[test]"')
pytestmark = pytest.mark.slow
NEW = 6
QUESTION = "what is in the picture"


def data_url(array, fmt="PNG"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def vision_server(vision_engine):
    """The tiny vision-language engine and VQGAN (tests/serve/conftest.py) served with at most 4 frames a video:
    dict(url, client (openai), engine, tok, vqgan, app, tmp (a folder for test files))."""
    from lwm.serve import create_app

    engine, tok, vqgan = vision_engine["engine"], vision_engine["tok"], vision_engine["vqgan"]
    app = create_app(engine, tok, model_name="tiny-vision", vqgan=vqgan, max_n_frames=4)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        yield dict(url=url, client=client, engine=engine, tok=tok, vqgan=vqgan, app=app, tmp=vision_engine["dir"])


def image(seed=0, shape=(40, 48, 3)):
    return np.random.default_rng(seed).integers(0, 255, shape, np.uint8)


def ask(server, parts, **kw):
    content = [{"type": "text", "text": QUESTION}] + parts
    return server["client"].chat.completions.create(
        model="tiny-vision", messages=[{"role": "user", "content": content}], max_tokens=NEW, temperature=0,
        extra_body={"return_token_ids": True}, **kw)


def reference(server, frames_uint8):
    """The engine's greedy answer for the original LWM-Chat prompt of these frames (as lwm.vision_chat)."""
    from lwm.text.chat_template import vision_chat_prompt
    from lwm.inference.vision import vision_tokens
    from lwm.utils.vision_io import resize_center_crop, to_model_range

    vqgan = server["vqgan"]
    side = vqgan.config.resolution
    frames = to_model_range(np.stack([resize_center_crop(f, side) for f in frames_uint8]))
    _, codes = vqgan.encode(frames)
    prompt = vision_chat_prompt(server["tok"], QUESTION, vision_tokens(np.asarray(codes)))
    result = server["engine"].generate([list(prompt.ids)], NEW, vision=[list(prompt.vision)])
    return list(prompt.ids), result.tokens[0]


def test_png_data_url_is_answered_like_vision_chat(vision_server):
    ids, want = reference(vision_server, [image(0)])
    r = ask(vision_server, [{"type": "image_url", "image_url": {"url": data_url(image(0))}}])
    assert r.model_extra["prompt_token_ids"] == ids
    assert r.choices[0].model_extra["token_ids"] == want
    assert r.choices[0].message.content == vision_server["tok"].decode(want)
    other = ask(vision_server, [{"type": "image_url", "image_url": {"url": data_url(image(1))}}])
    assert other.model_extra["prompt_token_ids"] != ids           # the image reaches the prompt (negative control)


def test_jpeg_and_frames_and_mp4(vision_server):
    from lwm.utils.vision_io import write_video

    from PIL import Image

    jpeg_url = data_url(image(2), "JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(jpeg_url.split(",", 1)[1]))).convert("RGB"))
    ids, want = reference(vision_server, [decoded])                  # the pixels the JPEG holds (it is lossy)
    jpeg = ask(vision_server, [{"type": "image_url", "image_url": {"url": jpeg_url}}])
    assert jpeg.model_extra["prompt_token_ids"] == ids and jpeg.choices[0].model_extra["token_ids"] == want
    assert jpeg.choices[0].message.content == vision_server["tok"].decode(want) and want
    frames = [image(3), image(4)]
    ids, want = reference(vision_server, frames)
    r = ask(vision_server, [{"type": "image_url", "image_url": {"url": data_url(f)}} for f in frames])
    assert r.model_extra["prompt_token_ids"] == ids and r.choices[0].model_extra["token_ids"] == want
    path = vision_server["tmp"] / "clip.mp4"
    write_video(str(path), np.stack([image(5, (32, 32, 3)), image(6, (32, 32, 3))]), fps=2)
    url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    video = ask(vision_server, [{"type": "video_url", "video_url": {"url": url}}])
    from lwm.utils.vision_io import read_video_frames

    clip = read_video_frames(str(path), 4)                           # as lwm.vision_chat reads the file
    assert len(clip) == 2                                            # both frames, not one
    ids, want = reference(vision_server, clip)
    assert video.model_extra["prompt_token_ids"] == ids and video.choices[0].model_extra["token_ids"] == want
    assert video.choices[0].message.content == vision_server["tok"].decode(want) and want


def test_bad_media_get_400_and_the_server_keeps_serving(vision_server, tmp_path):
    path = tmp_path / "local.png"
    from PIL import Image

    Image.fromarray(image(7)).save(path)
    cases = [
        ("text in an image part", "data:image/png;base64," + base64.b64encode(b"not an image at all").decode(),
         "not a PNG or JPEG"),
        ("bad base64", "data:image/png;base64,%%%", "base64"),
        ("remote URL", "https://example.com/cat.png", "only data: URLs"),
        ("local path", str(path), "--allow_local_media"),
    ]
    for name, url, needle in cases:
        with pytest.raises(openai.BadRequestError) as e:
            ask(vision_server, [{"type": "image_url", "image_url": {"url": url}}])
        assert needle in e.value.message and "content[1]" in e.value.message, (name, e.value.message)
        ok = ask(vision_server, [{"type": "image_url", "image_url": {"url": data_url(image(0))}}])
        assert ok.choices[0].finish_reason in ("stop", "length")


def test_local_media_behind_the_flag(vision_server, tmp_path):
    from PIL import Image

    from lwm.serve.media import frames_from_parts

    path = tmp_path / "local.png"
    Image.fromarray(image(0)).save(path)
    frames = frames_from_parts([("image", str(path), "p")], 32, 4, allow_local=True)
    again = frames_from_parts([("image", data_url(image(0)), "p")], 32, 4, allow_local=False)
    assert frames.shape == (1, 32, 32, 3) and np.array_equal(frames, again)


def test_image_generation_returns_the_direct_generation_as_png(vision_server):
    import jax
    from PIL import Image

    from lwm.inference.vision import FrameSampling, generate_frames
    from lwm.vision_generation import generation_prompts
    from lwm.utils.vision_io import to_uint8

    r = vision_server["client"].images.generate(model="tiny-vision", prompt="a red fox", extra_body={"seed": 3})
    png = base64.b64decode(r.data[0].b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    got = np.asarray(Image.open(io.BytesIO(png)))
    vq, engine, tok = vision_server["vqgan"], vision_server["engine"], vision_server["tok"]
    side = vq.config.codes_per_side
    model = type(engine.model)(engine.config.replace(sample_mode="vision"))
    cond, _ = generation_prompts(tok, "a red fox", "image")
    codes = generate_frames(model, engine.params, [cond], None, n_frames=1, tokens_per_frame=side * side + 1,
                            sampling=FrameSampling(1.0, 0, 1.0), rng=jax.random.PRNGKey(3), pad_id=tok.pad_id,
                            num_codes=vq.config.num_embeddings)
    want = to_uint8(vq.decode(np.asarray(codes)[:, 0, :-1].reshape(1, side, side)))[0]
    assert got.shape == (vq.config.resolution, vq.config.resolution, 3) and np.array_equal(got, want)
    with pytest.raises(openai.BadRequestError):
        vision_server["client"].images.generate(model="tiny-vision", prompt="a fox", size="1024x1024")
