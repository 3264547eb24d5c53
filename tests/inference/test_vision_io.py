"""lwm.utils.vision_io reads pixels as a viewer shows them: EXIF orientation (images) and display-matrix rotation
(videos) applied, every Pillow mode and bit depth mapped to 8-bit RGB over its full range, and memory that
does not grow with the aspect ratio (the crop box is taken before resampling). Each check has a negative
control: the naive reading (Pillow's plain open / convert('RGB') / resize-then-crop) fails it."""
import struct

import numpy as np
import pytest
from PIL import Image

from lwm.utils import vision_io


def _upright(h=40, w=64) -> np.ndarray:
    """uint8 (h, w, 3) with no symmetry: red ramps along x, green along y, a blue block top-left."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w)[None] * 255 // (w - 1)
    img[..., 1] = np.arange(h)[:, None] * 255 // (h - 1)
    img[:8, :8, 2] = 255
    return img


# EXIF orientation -> how the stored pixels relate to the upright picture (stored = f(upright)).
STORED = {
    3: lambda u: u[::-1, ::-1],                       # rotated 180
    6: lambda u: np.rot90(u, k=1),                     # the viewer turns it 90 degrees clockwise
    8: lambda u: np.rot90(u, k=-1),                    # ... 90 degrees counterclockwise
    2: lambda u: u[:, ::-1],                           # mirrored
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = _upright()
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)))
    exif = Image.Exif()
    exif[0x0112] = orientation                         # the Orientation tag
    path = tmp_path / "phone.png"
    stored.save(path, exif=exif)
    got = np.asarray(vision_io.to_rgb8(vision_io.read_image(str(path))))
    np.testing.assert_array_equal(got, upright)
    # Negative control: the stored pixels as they are (what the model got before) are not the picture.
    assert not np.array_equal(np.asarray(Image.open(path).convert("RGB")), upright)
    # Through the whole pipeline: the same frame as the upright file.
    Image.fromarray(upright).save(tmp_path / "upright.png")
    np.testing.assert_array_equal(vision_io.load_frames(str(path), 32),
                                  vision_io.load_frames(str(tmp_path / "upright.png"), 32))


RAMP = np.arange(0, 256, 5, dtype=np.uint8)[None]          # (1, 52): grey levels 0..255


def _ramp_in(mode: str) -> Image.Image:
    """The grey ramp RAMP stored in `mode` at that mode's own scale."""
    v = RAMP.astype(np.float64)
    if mode == "I;16":
        return Image.fromarray((v * 257).astype(np.uint16))               # 0..65535
    if mode == "I":
        return Image.fromarray((v * 257).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray((v / 255).astype(np.float32), "F")        # 0..1
    return Image.fromarray(RAMP, "L").convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV", "LAB", "I;16", "I", "F"])
def test_every_mode_maps_to_8_bit_rgb_over_its_full_range(mode):
    image = _ramp_in(mode)
    assert image.mode == mode
    got = np.asarray(vision_io.to_rgb8(image))
    assert got.dtype == np.uint8 and got.shape == RAMP.shape + (3,)
    tol = 2 if mode == "LAB" else 0                    # Lab <-> RGB rounds
    np.testing.assert_allclose(got.astype(int), np.repeat(RAMP[..., None], 3, -1).astype(int), atol=tol)


def test_sixteen_bit_png_keeps_its_range_and_naive_reading_does_not(tmp_path):
    wide = (np.linspace(0, 65535, 64)[None].repeat(32, 0)).astype(np.uint16)    # (32, 64) 16-bit ramp
    Image.fromarray(wide).save(tmp_path / "deep.png")
    image = Image.open(tmp_path / "deep.png")
    assert image.mode == "I;16"
    got = np.asarray(vision_io.to_rgb8(image))[..., 0]
    np.testing.assert_array_equal(got, np.round(wide / 257.0).astype(np.uint8))
    assert got.min() == 0 and got.max() == 255
    # Negative control: Pillow's own conversion saturates everything above 255 to white.
    naive = np.asarray(image.convert("RGB"))[..., 0]
    assert (naive == 255).mean() > 0.9


def test_one_bit_and_transparency(tmp_path):
    bits = Image.fromarray(np.array([[0, 255, 0, 255]], np.uint8)).convert("1")
    assert np.asarray(vision_io.to_rgb8(bits))[0, :, 0].tolist() == [0, 255, 0, 255]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)                      # opaque
    rgba[1, 1] = (10, 20, 30, 0)                        # fully transparent: the white background shows
    rgba[0, 1] = (0, 0, 0, 128)                         # half transparent black over white: mid grey
    got = np.asarray(vision_io.to_rgb8(Image.fromarray(rgba, "RGBA")))
    assert got[0, 0].tolist() == [10, 20, 30] and got[1, 1].tolist() == [255, 255, 255]
    assert abs(int(got[0, 1, 0]) - 127) <= 1
    # A palette image with a transparent index, saved and read back as PNG.
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([200, 0, 0, 0, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png", transparency=1)
    got = np.asarray(vision_io.to_rgb8(Image.open(tmp_path / "pal.png")))
    assert got[0].tolist() == [[200, 0, 0], [255, 255, 255]]


def _peak_mb_of(fn) -> float:
    """Growth of this process's peak resident memory (Linux VmHWM, reset first) while fn runs, in MiB."""
    def hwm():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                    # reset the peak to the current resident size
    before = hwm()
    fn()
    return hwm() - before


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_does_not_grow_with_the_aspect_ratio(tmp_path):
    for shape in ((1, 4000), (4000, 1)):
        img = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "thin.png")
        out = []
        grown = _peak_mb_of(lambda: out.append(vision_io.load_frames(str(tmp_path / "thin.png"), 256)))
        assert out[0].shape == (1, 256, 256, 3)
        assert grown < 40, (shape, grown)              # the output itself is 0.75 MiB (float32)
    # Negative control: the old resize-then-crop of a 1 x 1000 image (256 x 256,000 RGB intermediate,
    # Pillow keeps 4 bytes per pixel: ~250 MiB) shows up in the same measurement.
    thin = Image.fromarray(np.zeros((1, 1000, 3), np.uint8))
    grown = _peak_mb_of(lambda: thin.resize((256_000, 256), Image.Resampling.BICUBIC).crop((0, 0, 256, 256)))
    assert grown > 150, grown


def test_crop_box_matches_resize_then_crop():
    """The one-step resampling of the crop box gives the pixels of the original's resize-then-crop (to
    Pillow's 8-bit rounding), on a smooth image where both are well defined."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (6, 10, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((101, 67), Image.Resampling.BICUBIC))    # smooth, 101 x 67
    got = vision_io.resize_center_crop(img, 32)
    new_w = int(32 * 101 / 67)
    ref = Image.fromarray(img).resize((new_w, 32), Image.Resampling.BICUBIC)
    left = (new_w - 32) // 2
    ref = np.asarray(ref.crop((left, 0, left + 32, 32)))
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert np.abs(got.astype(int) - np.asarray(Image.fromarray(img).resize((32, 32))).astype(int)).max() > 10


def _rotated_mp4(path, frames):
    """An MP4 of `frames` whose track header carries the display matrix a phone writes for a portrait
    video (rotate 90 degrees clockwise to show), patched into the file as the QuickTime format lays it out."""
    vision_io.write_video(str(path) + ".plain.mp4", frames, fps=4)
    data = open(str(path) + ".plain.mp4", "rb").read()
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = data.index(identity, data.index(b"tkhd"))
    portrait = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
    with open(path, "wb") as f:
        f.write(data[:at] + portrait + data[at + 36:])


def test_video_rotation_is_applied(tmp_path):
    import av

    stored = np.zeros((3, 32, 64, 3), np.uint8)
    stored[:, :16, :, 0] = 255                          # red on top of the stored frames
    path = tmp_path / "portrait.mp4"
    _rotated_mp4(path, stored)
    with av.open(str(path)) as c:
        assert next(c.decode(video=0)).rotation == -90
    frames = vision_io.read_video_frames(str(path), 3)
    assert frames[0].shape == (64, 32, 3)               # shown portrait
    red = frames[0][..., 0].astype(float)
    assert red[:, 16:].mean() > 200 and red[:, :16].mean() < 50     # the top went to the right: clockwise
    # Negative control: the frames as stored are landscape.
    with av.open(str(path)) as c:
        assert next(c.decode(video=0)).to_ndarray(format="rgb24").shape == (32, 64, 3)
    assert vision_io.upright(stored[0], 90).shape == (64, 32, 3)
    with pytest.raises(ValueError, match="multiples of 90"):
        vision_io.upright(stored[0], 45)


def test_sixteen_bit_video_frames_keep_their_range(tmp_path):
    import av

    deep = (np.linspace(0, 65535, 64)[None].repeat(32, 0)).astype(np.uint16)        # (32, 64) 16-bit ramp
    path = str(tmp_path / "deep.mkv")
    with av.open(path, "w") as c:
        stream = c.add_stream("ffv1", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "gray16le"
        for _ in range(2):
            c.mux(stream.encode(av.VideoFrame.from_ndarray(deep, format="gray16le")))
        c.mux(stream.encode())
    (frame, _) = vision_io.read_video_frames(path, 2)
    assert frame.dtype == np.uint8 and frame.shape == (32, 64, 3)
    np.testing.assert_allclose(frame[..., 0].astype(int), np.round(deep / 257.0).astype(int), atol=1)
    assert frame.min() == 0 and frame.max() >= 254
    # Negative control: the decoded samples taken as 8-bit (the low byte) are not the picture.
    with av.open(path) as c:
        raw = next(c.decode(video=0)).to_ndarray()
    assert np.abs(raw.astype(np.uint8).astype(int) - frame[..., 0].astype(int)).max() > 100
