"""Pixels in and out of the vision entry points: read an image or a video, pick frames uniformly, resize and
centre-crop them to the VQGAN's square, and write PNG / JPEG / MP4.

Frames are numpy arrays: uint8 (T, H, W, 3) on disk, float32 in [-1, 1] for the VQGAN.

    frames = load_frames("clip.mp4", size=256, max_n_frames=8)   # (T <= 8, 256, 256, 3) float32 in [-1, 1]
    write_video("out.mp4", to_uint8(pixels), fps=4)               # pixels (T, H, W, 3) in [-1, 1]

Images are read and written with Pillow; videos are read with PyAV (any container/codec FFmpeg decodes) and
written as MP4 (H.264) with PyAV, in-process (no ffmpeg subprocess).
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_WRITE_EXTENSIONS = (".mp4",)


def is_image_path(path: str) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


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


def resize_center_crop(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Scale the shorter side to `size` (bicubic), then cut the central size x size square.
    Returns uint8 (size, size, 3). A 512x256 (W x H) image with size 256 keeps columns 128..383 unscaled."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    width, height = image.size
    if width < height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def to_model_range(frames: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1, as the original)."""
    return np.asarray(frames, np.float32) / 127.5 - 1.0


def to_uint8(frames) -> np.ndarray:
    """[-1, 1] -> uint8 [0, 255], rounded and clipped."""
    return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def read_image(path: str) -> Image.Image:
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            image = Image.open(f)
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read as an image ({e})") from None
    return image.convert("RGB")


def _decode_video(path: str) -> Iterator[np.ndarray]:
    """Every frame of the first video stream of `path`, as uint8 (H, W, 3)."""
    import av

    if "://" not in str(path) and not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot read as a video ({e}); images must end in one of "
                         f"{IMAGE_EXTENSIONS}") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise ValueError(f"{path}: video decoding failed ({e})") from None


def _header_frame_count(path: str) -> int:
    """Frame count the container declares (0 when it does not say)."""
    import av

    try:
        with av.open(path) as container:
            return int(container.streams.video[0].frames) if container.streams.video else 0
    except av.error.FFmpegError:
        return 0


def read_video_frames(path: str, max_n_frames: int) -> list[np.ndarray]:
    """At most `max_n_frames` frames of a video, chosen by `sample_frame_indices`, as uint8 (H, W, 3) arrays.
    Only the chosen frames are kept in memory. When the container's frame count is missing or wrong, the
    frames are counted by decoding and the choice is made again."""
    declared = _header_frame_count(path)
    if declared > 0:
        wanted = set(sample_frame_indices(declared, max_n_frames))
        kept, total = [], 0
        for i, frame in enumerate(_decode_video(path)):
            total = i + 1
            if i in wanted:
                kept.append(frame)
        if total == declared:
            return kept
    total = sum(1 for _ in _decode_video(path))
    if total == 0:
        raise ValueError(f"{path}: the video has no frames")
    wanted = set(sample_frame_indices(total, max_n_frames))
    return [frame for i, frame in enumerate(_decode_video(path)) if i in wanted]


def load_frames(path: str, size: int, max_n_frames: int = 1) -> np.ndarray:
    """An image file (by extension, IMAGE_EXTENSIONS) or a video -> float32 (T, size, size, 3) in [-1, 1],
    each frame resized and centre-cropped (`resize_center_crop`); T = 1 for an image, <= max_n_frames else."""
    if is_image_path(path):
        frames = [resize_center_crop(read_image(path), size)]
    else:
        frames = [resize_center_crop(f, size) for f in read_video_frames(path, max_n_frames)]
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
