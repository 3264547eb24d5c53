"""Images and videos inside chat requests -> frames for the VQGAN.

A media part's URL is a `data:` URL, `data:image/png;base64,...` (PNG or JPEG; a GIF/WebP that Pillow reads is
taken too) or `data:video/mp4;base64,...`, or, only when the server runs with `--allow_local_media`, a local
path (`/abs/path.png` or `file:///abs/path.mp4`). Remote `http(s)://` URLs are refused: the server fetches
nothing. Decoding, orientation, resizing and cropping are `lwm.utils.vision_io`'s (the one home of pixel reading,
tests/test_one_home.py::test_rule_holds[pixel_reading]); this module only turns URLs into bytes and bytes into a
file `vision_io` reads.

Errors are `APIError(400)` naming the message and part, e.g.
    messages[1].content[0]: the image data is not a PNG or JPEG image (cannot identify image file)
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import tempfile
from typing import Sequence

import numpy as np

from lwm.serve.errors import bad_request

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".png", "WEBP": ".webp", "BMP": ".bmp"}


def read_url(url: str, where: str, allow_local: bool) -> bytes:
    """The bytes behind a media URL (module docstring); APIError(400) naming `where` otherwise."""
    match = _DATA_URL.match(url)
    if match:
        payload = url[match.end():]
        if not match.group("b64"):
            raise bad_request(f"{where}: a data: URL must be base64 encoded (data:image/png;base64,...)", where)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"{where}: the data: URL's base64 payload does not decode ({e})", where) from None
    if re.match(r"^[a-z][a-z0-9+.-]*://", url, re.IGNORECASE) and not url.lower().startswith("file://"):
        raise bad_request(f"{where}: only data: URLs are accepted (the server fetches nothing); got "
                          f"{url.split('://')[0]}://...", where)
    path = url[len("file://"):] if url.lower().startswith("file://") else url
    if not allow_local:
        raise bad_request(f"{where}: local media paths are refused; send a data: URL, or start the server "
                          "with --allow_local_media", where)
    if not os.path.isfile(path):
        raise bad_request(f"{where}: no such file {path!r}", where)
    with open(path, "rb") as f:
        return f.read()


def _image_format(data: bytes) -> str | None:
    """Pillow's format name ('PNG', 'JPEG', ...) of `data`, or None when it is no image Pillow reads."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            return image.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def decode_media(data: bytes, where: str, size: int, max_n_frames: int, kind: str) -> np.ndarray:
    """Bytes of an image (kind 'image': PNG/JPEG) or of a video ('image' parts may carry an mp4 too; 'video')
    -> float32 (T, size, size, 3) in [-1, 1] by `lwm.utils.vision_io.load_frames`. APIError(400) when the bytes are
    neither."""
    from lwm.utils.vision_io import load_frames

    fmt = _image_format(data)
    if fmt is not None and fmt not in IMAGE_FORMATS:
        raise bad_request(f"{where}: image format {fmt} is not supported; send PNG or JPEG", where)
    if fmt is None and not _looks_like_video(data):
        what = "a PNG or JPEG image" if kind == "image" else "a video (mp4) or an image"
        raise bad_request(f"{where}: the data is not {what}", where, "invalid_image")
    suffix = IMAGE_FORMATS[fmt] if fmt else ".mp4"
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(data)
        f.flush()
        try:
            return load_frames(f.name, size, max_n_frames)
        except (ValueError, OSError) as e:
            text = str(e).replace(f.name, "the data").replace(f.name.rsplit('/', 1)[-1], "the data")
            raise bad_request(f"{where}: cannot decode the media ({text})", where, "invalid_image") from None


def _looks_like_video(data: bytes) -> bool:
    """ISO media (mp4/mov: 'ftyp' at byte 4), Matroska/WebM, AVI or MPEG-TS by their magic bytes."""
    return (data[4:8] == b"ftyp" or data[:4] == b"\x1a\x45\xdf\xa3" or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")
            or (len(data) > 188 and data[0] == 0x47 and data[188] == 0x47))


def frames_from_parts(parts: Sequence[tuple[str, str, str]], size: int, max_n_frames: int,
                      allow_local: bool) -> np.ndarray:
    """Media parts of one message, [(kind 'image'|'video', url, where)], -> (T, size, size, 3) in [-1, 1].
    One part: its frames (a video is sampled to at most max_n_frames). Several parts: each is one frame of a
    video, in order (a video among several parts is refused); more than max_n_frames are thinned evenly
    (`lwm.utils.vision_io.sample_frame_indices`)."""
    from lwm.utils.vision_io import sample_frame_indices

    if len(parts) == 1:
        kind, url, where = parts[0]
        return decode_media(read_url(url, where, allow_local), where, size, max_n_frames, kind)
    frames = []
    for kind, url, where in parts:
        data = read_url(url, where, allow_local)
        if kind == "video" or _looks_like_video(data):
            raise bad_request(f"{where}: a video cannot be one of several frames; send it as the message's only "
                              "media part", where)
        frames.append(decode_media(data, where, size, 1, kind)[0])
    keep = sample_frame_indices(len(frames), max_n_frames)
    return np.stack([frames[i] for i in keep])
