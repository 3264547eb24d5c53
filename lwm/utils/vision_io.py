"""Pixels in and out of the vision entry points: read an image or a video, pick frames uniformly, resize and
centre-crop them to the VQGAN's square, and write PNG / JPEG / MP4.

Frames are numpy arrays: uint8 (T, H, W, 3) on disk, float32 in [-1, 1] for the VQGAN.

    frames = load_frames("clip.mp4", size=256, max_n_frames=8)   # (T <= 8, 256, 256, 3) float32 in [-1, 1]
    write_video("out.mp4", to_uint8(pixels), fps=4)               # pixels (T, H, W, 3) in [-1, 1]

Images are read and written with Pillow; videos are read with PyAV (any container/codec FFmpeg decodes) and
written as MP4 (H.264) with PyAV, in-process (no ffmpeg subprocess). Pixels reach the model as a viewer shows
them: EXIF orientation (images) and display-matrix rotation (videos) applied, every mode and bit depth
mapped to 8-bit RGB over its full range (`to_rgb8`), and the crop box computed before resampling
(`crop_box`), so memory does not grow with the aspect ratio.

Budgets, checked from the file's header before any pixel is decoded (a 158 KB PNG can declare 9000 x 9000
16-bit pixels; an 83 KB mp4 can hold 1,500 1080p frames): an image's decoded bytes, width x height x bytes per
pixel of the mode Pillow decodes it to (at least 3, the 8-bit RGB copy made of it), at most `max_image_bytes`
(default MAX_IMAGE_BYTES, 128 MiB: a 44-megapixel 8-bit RGB photo); a video's frames x width x height at most
`max_video_pixels` (default MAX_VIDEO_PIXELS, 2**30: about 520 frames of 1080p or 3,500 of 640x480), checked
again while decoding in case the header is missing or lies; each video frame is held to `max_image_bytes`
too. Over a budget raises `MediaTooLarge` (a ValueError) naming the size and the budget. Only the frames kept
(`sample_frame_indices`) are converted to RGB.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
from PIL import Image

MAX_IMAGE_BYTES = 1 << 27      # bytes of one decoded image or video frame (module docstring)
MAX_VIDEO_PIXELS = 1 << 30     # frames x width x height of one video

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_WRITE_EXTENSIONS = (".mp4",)


def is_image_path(path: str) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


class MediaTooLarge(ValueError):
    """An image or a video whose header declares more pixels than its budget (module docstring)."""


_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
                    "I": 4, "F": 4}                       # others ('RGBA', 'CMYK', ...): 4; 'I;16*': 2


def decoded_bytes_per_pixel(mode: str) -> int:
    """Bytes per pixel of a Pillow mode's samples ('L' 1, 'I;16' 2, 'RGB' 3, 'RGBA' 4, 'I' and 'F' 4), at least
    3: the 8-bit RGB copy `to_rgb8` makes of it."""
    return max(2 if mode.startswith("I;16") else _BYTES_PER_PIXEL.get(mode, 4), 3)


def check_image_budget(width: int, height: int, mode: str, max_image_bytes: int, source: str) -> None:
    """MediaTooLarge naming `source` when width x height x `decoded_bytes_per_pixel(mode)` > max_image_bytes."""
    need = int(width) * int(height) * decoded_bytes_per_pixel(mode)
    if need > max_image_bytes:
        raise MediaTooLarge(f"{source}: the image is {width} x {height} ({mode}), {need:,} bytes decoded, over the "
                            f"budget of {max_image_bytes:,} bytes (max_image_bytes)")


def check_video_budget(n_frames: int, width: int, height: int, max_video_pixels: int, source: str) -> None:
    """MediaTooLarge naming `source` when n_frames x width x height > max_video_pixels."""
    need = int(n_frames) * int(width) * int(height)
    if need > max_video_pixels:
        raise MediaTooLarge(f"{source}: the video has {n_frames} frames of {width} x {height} ({need:,} pixels), "
                            f"over the budget of {max_video_pixels:,} pixels (max_video_pixels)")


def sample_frame_indices(num_frames: int, max_n_frames: int) -> list[int]:
    """Every frame when there are at most `max_n_frames`, else `max_n_frames` indices spread evenly from the
    first frame to the last (rounded down), as the original LWM picks them.

    >>> sample_frame_indices(10, 4)
    [0, 3, 6, 9]
    >>> sample_frame_indices(3, 8)
    [0, 1, 2]
    """
    if num_frames < 1:
        raise ValueError(f"sample_frame_indices: num_frames={num_frames} must be positive")
    if max_n_frames < 1:
        raise ValueError(f"max_n_frames={max_n_frames} must be positive")
    if num_frames <= max_n_frames:
        return list(range(num_frames))
    return np.linspace(0, num_frames - 1, max_n_frames).astype(int).tolist()


def crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source rectangle (left, top, right, bottom), in pixels of the (width x height) image, that becomes the
    size x size output: the central square of the image after its shorter side is scaled to `size` (the
    original's resize-then-crop, with the resized length rounded down and the crop offset taken in resized
    pixels). Worked example: 64 x 40 to 32 -> resized 51 x 32, offset 9 -> box (11.29, 0.0, 51.45, 40.0)."""
    if width < height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = width / new_w, height / new_h                   # source pixels per resized pixel
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def resize_center_crop(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Scale the shorter side to `size` (bicubic) and cut the central size x size square, in one resampling
    of the source rectangle that square comes from (`crop_box`): memory is that of the output, whatever the
    aspect ratio (a 1 x 4000 image does not pass through a 256 x 1,024,000 intermediate).
    Any mode is first made 8-bit RGB (`to_rgb8`). Returns uint8 (size, size, 3). A 512x256 (W x H) image
    with size 256 keeps columns 128..383 unscaled."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = to_rgb8(image)
    width, height = image.size
    box = crop_box(width, height, size)
    if box[2] - box[0] == size and box[3] - box[1] == size and float(box[0]).is_integer() \
            and float(box[1]).is_integer():
        out = image.crop(tuple(int(b) for b in box))          # no scaling: a pure crop
    else:
        out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, np.uint8)


# Modes whose pixels are integers of 16 bits (PNG, TIFF) or 32 bits (PIL's 'I', read from 16-bit files by older
# Pillow): scaled from [0, 65535] to [0, 255]. 'F' (32-bit float, e.g. TIFF) is taken as [0, 1].
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> 8-bit 'RGB' over the mode's full range, as an image viewer shows it:
    '1' and 'L' -> grey; 'I;16*' and 'I' -> value / 65535 (16-bit data); 'F' -> value in [0, 1]; 'P'
    through its palette; 'CMYK', 'YCbCr', 'LAB', 'HSV' by Pillow's conversions; an alpha channel ('LA', 'PA',
    'RGBA', 'La', 'RGBa', a palette or 'L'/'RGB' with a transparent colour) composited over `background`
    (white). Values outside a mode's range are clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT or mode == "F":
        values = np.asarray(image)                           # its own dtype (uint16 / int32 / float32)
        scale = 65535.0 if mode != "F" else 1.0
        grey = np.empty(values.shape, np.uint8)
        rows = max(1, (1 << 20) // max(values.shape[1], 1))   # float64 temporaries of ~8 MB, not of the image
        for r in range(0, values.shape[0], rows):
            grey[r:r + rows] = np.clip(np.round(values[r:r + rows].astype(np.float64) * (255.0 / scale)), 0, 255)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("La", "RGBa"):
        image = image.convert(mode.upper())                   # undo premultiplied alpha
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")                          # palette entries and transparent colours
    if image.mode in ("LA", "RGBA"):
        canvas = Image.new("RGBA", image.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def oriented(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (a phone photo stored sideways comes out upright,
    as a viewer shows it); unchanged without the tag."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def to_model_range(frames: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1, as the original)."""
    return np.asarray(frames, np.float32) / 127.5 - 1.0


def to_uint8(frames) -> np.ndarray:
    """[-1, 1] -> uint8 [0, 255], rounded and clipped."""
    return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def read_image(path: str, max_image_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """The image at `path` (local or fsspec URL) in its own mode, turned upright by its EXIF orientation.
    Raises FileNotFoundError, MediaTooLarge from the header when it decodes to more than `max_image_bytes`
    (`check_image_budget`; nothing decoded), or ValueError naming the file when it is not a readable image."""
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            image = Image.open(f)                             # reads the header only
            check_image_budget(*image.size, image.mode, max_image_bytes, str(path))
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except Image.DecompressionBombError as e:                 # Pillow's own limit, past ours when ours is raised
        raise MediaTooLarge(f"{path}: {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read as an image ({e})") from None
    return oriented(image)


def upright(frame: np.ndarray, rotation: float) -> np.ndarray:
    """A decoded frame (H, W, C) turned as its display matrix says: `rotation` is FFmpeg's
    av_display_rotation_get angle (degrees counterclockwise, as PyAV's VideoFrame.rotation gives it), so the
    frame is rotated counterclockwise by that angle, which is what FFmpeg's own autorotation does
    (a phone video recorded upright has -90 or 90). Only multiples of 90 occur in practice; others raise."""
    turns = round(rotation / 90.0)
    if abs(rotation - 90.0 * turns) > 1e-3:
        raise ValueError(f"video rotation {rotation} degrees: only multiples of 90 are supported")
    return np.ascontiguousarray(np.rot90(frame, k=turns % 4)) if turns % 4 else frame


def _open_video(path: str):
    """(container, its first video stream); FileNotFoundError or ValueError naming `path`."""
    import av

    if "://" not in str(path) and not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot read as a video ({e}); images must end in one of "
                         f"{IMAGE_EXTENSIONS}") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: has no video stream")
    return container, container.streams.video[0]


def video_header(path: str) -> tuple[int, int, int]:
    """(frames, width, height) that the container declares, nothing decoded. frames: the stream's frame count,
    else its duration x average frame rate (rounded up), else 0 when the header says neither."""
    container, stream = _open_video(path)
    with container:
        frames = int(stream.frames or 0)
        if frames <= 0 and stream.average_rate:
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = (container.duration or 0) / 1e6          # microseconds (AV_TIME_BASE)
            frames = int(np.ceil(seconds * float(stream.average_rate)))
        ctx = stream.codec_context
        return max(frames, 0), int(ctx.width or 0), int(ctx.height or 0)


def _decode_video(path: str, max_video_pixels: int = MAX_VIDEO_PIXELS,
                  max_image_bytes: int = MAX_IMAGE_BYTES) -> Iterator:
    """Every frame of the first video stream of `path` as PyAV VideoFrames, decoded but not converted (the
    caller converts the frames it keeps, `_to_rgb`). The pixels decoded so far are held to max_video_pixels
    and each frame to max_image_bytes (MediaTooLarge), whatever the header said."""
    import av

    container, stream = _open_video(path)
    with container:
        pixels = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                pixels += frame.width * frame.height
                if pixels > max_video_pixels:                     # the header had no count, or lied
                    raise MediaTooLarge(f"{path}: the video decodes to more than {max_video_pixels:,} pixels "
                                        f"by frame {i + 1} ({frame.width} x {frame.height}), over the budget "
                                        "(max_video_pixels)")
                check_image_budget(frame.width, frame.height, "RGB", max_image_bytes, str(path))
                yield frame
        except av.error.FFmpegError as e:
            raise ValueError(f"{path}: video decoding failed ({e})") from None


def _to_rgb(frame) -> np.ndarray:
    """A PyAV VideoFrame -> uint8 (H, W, 3) full-range RGB (PyAV's conversion from the stream's pixel format and
    bit depth), turned upright (`upright`)."""
    return upright(frame.to_ndarray(format="rgb24"), frame.rotation)


def read_video_frames(path: str, max_n_frames: int, max_video_pixels: int = MAX_VIDEO_PIXELS,
                      max_image_bytes: int = MAX_IMAGE_BYTES) -> list[np.ndarray]:
    """At most `max_n_frames` frames of a video, chosen by `sample_frame_indices`, as uint8 (H, W, 3) arrays.
    The header is checked against the budgets first (`video_header`, `check_video_budget`, `check_image_budget`:
    MediaTooLarge before anything is decoded); only the chosen frames are converted to RGB and kept. When the
    header's frame count is missing or wrong, the frames counted while decoding choose again, and a second pass
    keeps those."""
    declared, width, height = video_header(path)
    check_image_budget(width, height, "RGB", max_image_bytes, str(path))
    check_video_budget(declared, width, height, max_video_pixels, str(path))
    total = 0
    if declared > 0:
        wanted = set(sample_frame_indices(declared, max_n_frames))
        kept = []
        for i, frame in enumerate(_decode_video(path, max_video_pixels, max_image_bytes)):
            total = i + 1
            if i in wanted:
                kept.append(_to_rgb(frame))
        if total == declared:
            return kept
    else:
        total = sum(1 for _ in _decode_video(path, max_video_pixels, max_image_bytes))
    if total == 0:
        raise ValueError(f"{path}: the video has no frames")
    wanted = set(sample_frame_indices(total, max_n_frames))
    return [_to_rgb(frame) for i, frame in enumerate(_decode_video(path, max_video_pixels, max_image_bytes))
            if i in wanted]


def load_frames(path: str, size: int, max_n_frames: int = 1, max_image_bytes: int = MAX_IMAGE_BYTES,
                max_video_pixels: int = MAX_VIDEO_PIXELS) -> np.ndarray:
    """An image file (by extension, IMAGE_EXTENSIONS) or a video -> float32 (T, size, size, 3) in [-1, 1],
    each frame resized and centre-cropped (`resize_center_crop`); T = 1 for an image, <= max_n_frames else.
    MediaTooLarge (a ValueError) from the header when over a budget (module docstring)."""
    if is_image_path(path):
        frames = [resize_center_crop(read_image(path, max_image_bytes), size)]
    else:
        frames = [resize_center_crop(f, size)
                  for f in read_video_frames(path, max_n_frames, max_video_pixels, max_image_bytes)]
    return to_model_range(np.stack(frames))


def write_image(path: str, frame: np.ndarray) -> None:
    """uint8 (H, W, 3) -> PNG or JPEG, by the extension of `path`."""
    if not is_image_path(path):
        raise ValueError(f"{path}: an image file must end in one of {IMAGE_EXTENSIONS}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(frame, np.uint8)).save(path)


def write_video(path: str, frames: np.ndarray, fps: int = 4) -> None:
    """uint8 (T, H, W, 3) -> MP4 (H.264, yuv420p, so H and W must be even), encoded in-process by PyAV."""
    import av

    if not str(path).lower().endswith(VIDEO_WRITE_EXTENSIONS):
        raise ValueError(f"{path}: a video file must end in one of {VIDEO_WRITE_EXTENSIONS}")
    frames = np.asarray(frames, np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video: expected frames (T, H, W, 3) with even H and W, got shape {frames.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=int(fps), options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())                                   # flush the encoder
