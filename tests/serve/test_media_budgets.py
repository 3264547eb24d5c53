"""Media budgets before work (`lwm.utils.vision_io`, `lwm.serve.media`): small files that declare huge images or
videos are refused from their header, quickly and as 400s, while normal-sized media decode as before.

- A 157 KB data URL of a 9000 x 9000 16-bit PNG (the issue's case) is a 400 under the default budget in well
  under a second; a 3000 x 3000 16-bit PNG is refused under a budget below its size and decodes under one above
  (control), to the pixels of the full-range formula computed here in float64.
- A decompression-bomb PNG (past Pillow's own limit) is a 400, not an exception that would be a 500.
- An mp4 of many frames is refused from its header under a frame budget below it (nothing decoded), and
  decodes under one above (control) to the frames a plain PyAV decode gives; only the kept frames are converted
  to RGB; a header that understates the frames is caught while decoding.
"""
import base64
import struct
import time
import zlib

import numpy as np
import pytest

from lwm.serve.errors import APIError
from lwm.serve.media import decode_media, frames_from_parts
from lwm.utils import vision_io


def _png(width: int, height: int, rows=None, bit_depth: int = 16, color_type: int = 0) -> bytes:
    """A PNG of width x height (grey, 16-bit by default) whose IDAT holds `rows` rows of zeros (all of them by
    default; fewer leaves it truncated: its header still declares the full size)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + width * {0: 1, 2: 3}[color_type] * bit_depth // 8)     # filter byte + samples
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _refused(fn) -> tuple[APIError, float]:
    start = time.perf_counter()
    with pytest.raises(APIError) as info:
        fn()
    return info.value, time.perf_counter() - start


def test_the_issue_png_is_a_400_from_its_header():
    """9000 x 9000 16-bit grey (243 MB as 8-bit RGB; 2 GB and 9 s before): refused under the default budget.
    Its IDAT holds one row (the full 157 KB file takes 0.8 s to make; the refusal reads only the header)."""
    data = _png(9000, 9000, rows=1)
    assert len(data) < 1000
    err, seconds = _refused(lambda: frames_from_parts([("image", _data_url(data, "image/png"), "p")], 32, 4, False))
    assert err.status == 400 and err.param == "p" and seconds < 0.5, (err.status, seconds)
    assert err.message == ("p: the image is 9000 x 9000 (I;16), 243,000,000 bytes decoded, over the budget of "
                           "134,217,728 bytes (max_image_bytes)")


def test_pixel_budget_refuses_and_its_control_decodes():
    """2000 x 2000 16-bit (12 MB as 8-bit RGB): a 400 under 8 MB; under the default it decodes to the full-range
    grey (value / 65535 * 255, rounded) of a gradient PNG written by Pillow."""
    from PIL import Image
    import io

    values = (np.arange(2000 * 2000, dtype=np.uint32) * 7 % 65536).astype(np.uint16).reshape(2000, 2000)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")           # mode I;16
    data = buf.getvalue()
    err, seconds = _refused(lambda: decode_media(data, "p", 32, 1, "image", max_image_bytes=8 << 20))
    assert err.status == 400 and "over the budget of 8,388,608 bytes (max_image_bytes)" in err.message
    assert err.code == "media_too_large"
    assert seconds < 0.5
    got = decode_media(data, "p", 32, 1, "image")                # control: under the default budget it decodes
    grey = np.clip(np.round(values.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    want = vision_io.to_model_range(vision_io.resize_center_crop(np.stack([grey] * 3, -1), 32))[None]
    np.testing.assert_array_equal(got, want)


def test_decompression_bomb_is_a_400():
    """20000 x 20000 declares 400 M pixels, past Pillow's bomb limit (2 x 89.5 M): with our budget lifted out of
    the way, Pillow's own DecompressionBombError must still become a 400 (it was a 500); under the default budget
    a 400 too (Pillow's limit is checked as the header is read)."""
    data = _png(20000, 20000, rows=1, bit_depth=8)
    err, _ = _refused(lambda: decode_media(data, "p", 32, 1, "image", max_image_bytes=1 << 40))
    assert err.status == 400 and "decompression bomb" in err.message.lower() and "\n" not in err.message
    assert err.code == "media_too_large"
    err, _ = _refused(lambda: decode_media(data, "p", 32, 1, "image"))
    assert err.status == 400 and err.message.startswith("p: ")


def _mp4(path, n_frames: int, width: int, height: int) -> bytes:
    """An H.264 mp4 of n_frames frames (a moving bar, so frames differ), made in-process by PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"preset": "ultrafast", "crf": "30"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[:, (i * 4) % width:(i * 4) % width + 8] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path.read_bytes()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """120 frames of 320 x 240 (9.2 M pixels), a few KB."""
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    return path, _mp4(path, 120, 320, 240)


def test_frame_budget_refuses_from_the_header_and_its_control_decodes(clip, monkeypatch):
    path, data = clip
    url = _data_url(data, "video/mp4")
    decoded = []
    real = vision_io._decode_video
    monkeypatch.setattr(vision_io, "_decode_video", lambda *a, **k: decoded.append(1) or real(*a, **k))
    err, seconds = _refused(lambda: frames_from_parts([("video", url, "v")], 32, 4, False,
                                                      max_video_pixels=5_000_000))
    assert err.status == 400 and seconds < 0.5 and not decoded and err.code == "media_too_large"
    assert err.message == ("v: the video has 120 frames of 320 x 240 (9,216,000 pixels), over the budget of "
                           "5,000,000 pixels (max_video_pixels)")
    # control: under a budget above it, the frames a plain PyAV decode gives at the sampled indices
    import av

    got = frames_from_parts([("video", url, "v")], 32, 4, False, max_video_pixels=10_000_000)
    with av.open(str(path)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    want = vision_io.to_model_range(np.stack([vision_io.resize_center_crop(every[i], 32)
                                              for i in vision_io.sample_frame_indices(len(every), 4)]))
    np.testing.assert_array_equal(got, want)


def test_only_the_kept_frames_are_converted(clip, monkeypatch):
    path, _ = clip
    converted = []
    real = vision_io._to_rgb
    monkeypatch.setattr(vision_io, "_to_rgb", lambda frame: converted.append(1) or real(frame))
    frames = vision_io.read_video_frames(str(path), 4)
    assert len(frames) == 4 and len(converted) == 4


def test_a_header_that_understates_the_frames_is_caught_while_decoding(clip, monkeypatch):
    """The header claims 10 frames (passes a 1 M pixel budget); decoding stops at the frame past the budget
    (14 x 76,800 > 1 M), not after all 120. Control: the true header is refused before decoding."""
    path, _ = clip
    monkeypatch.setattr(vision_io, "video_header", lambda p: (10, 320, 240))
    with pytest.raises(vision_io.MediaTooLarge, match=r"more than 1,000,000 pixels by frame 14 \(320 x 240\)"):
        vision_io.read_video_frames(str(path), 4, max_video_pixels=1_000_000)
    monkeypatch.undo()
    with pytest.raises(vision_io.MediaTooLarge, match=r"the video has 120 frames"):
        vision_io.read_video_frames(str(path), 4, max_video_pixels=1_000_000)


def test_the_default_video_budget_refuses_the_issue_clip():
    """1,500 frames of 1920 x 1080 (the issue's 83 KB mp4) is over MAX_VIDEO_PIXELS; 8 such frames are not."""
    with pytest.raises(vision_io.MediaTooLarge, match="max_video_pixels"):
        vision_io.check_video_budget(1500, 1920, 1080, vision_io.MAX_VIDEO_PIXELS, "clip.mp4")
    vision_io.check_video_budget(8, 1920, 1080, vision_io.MAX_VIDEO_PIXELS, "clip.mp4")


def test_the_server_passes_its_budgets_to_the_media(tmp_path):
    """`create_app(max_image_bytes=...)` -> ServedModel -> frames_from_parts: a 2000 x 2000 16-bit image is a 400
    naming the budget in a served model built with an 8 MB budget, and gets past the media step (to the VQGAN,
    a stub that stops there) in one built with the default (control). The flag defaults are the library's."""
    from types import SimpleNamespace

    from PIL import Image
    import io

    from lwm.serve.__main__ import get_default_config
    from lwm.serve.loading import check_flags
    from lwm.serve.model import ServedModel
    from support import small_tokenizer

    class Reached(Exception):
        pass

    class StubVQGAN:
        config = SimpleNamespace(resolution=32, codes_per_side=8)

        def encode(self, frames):
            raise Reached(frames.shape)

    buf = io.BytesIO()
    Image.fromarray(np.zeros((2000, 2000), np.uint16)).save(buf, format="PNG")
    media = [("image", _data_url(buf.getvalue(), "image/png"), "messages[0].content[1]")]
    plain = [{"role": "user", "content": "what is in the picture"}]
    engine = SimpleNamespace(config=SimpleNamespace(vision_vocab_size=8, max_sequence_length=4096))
    tok = small_tokenizer(tmp_path)
    small = ServedModel(engine, tok, "m", vqgan=StubVQGAN(), max_image_bytes=8 << 20)
    with pytest.raises(APIError, match=r"over the budget of 8,388,608 bytes \(max_image_bytes\)") as info:
        small.vision_prompt(plain, media)
    assert info.value.status == 400 and info.value.param == "messages[0].content[1]"
    with pytest.raises(Reached, match=r"\(1, 32, 32, 3\)"):                     # control: the default budget
        ServedModel(engine, tok, "m", vqgan=StubVQGAN()).vision_prompt(plain, media)

    config = get_default_config()
    assert (config.max_image_bytes, config.max_video_pixels) == (vision_io.MAX_IMAGE_BYTES, vision_io.MAX_VIDEO_PIXELS)
    config.max_video_pixels = 0
    with pytest.raises(ValueError, match=r"--max_video_pixels=0: must be >= 1"):
        check_flags(config)
