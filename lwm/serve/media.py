"""Images and videos inside chat requests -> frames for the VQGAN.

A media part's URL is a `data:` URL, `data:image/png;base64,...` (PNG or JPEG; a GIF/WebP that Pillow reads is
taken too) or `data:video/mp4;base64,...`, or, only when the server runs with `--allow_local_media`, a local
path (`/abs/path.png` or `file:///abs/path.mp4`). Remote `http(s)://` URLs are refused: the server fetches
nothing. Decoding, orientation, resizing and cropping are `lwm.utils.vision_io`'s (the one home of pixel reading,
tests/test_one_home.py::test_rule_holds[pixel_reading]); this module only turns URLs into bytes and bytes into a
file `vision_io` reads.

Budgets before work (`lwm.utils.vision_io`'s, flags of the server): an image whose header declares more than
`max_image_bytes` decoded bytes, or a video whose header (or decoding) reaches more than `max_video_pixels`
frames x width x height, is a 400 before its pixels are decoded; so is an image past Pillow's own
decompression-bomb limit.

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
from lwm.utils.vision_io import MAX_IMAGE_BYTES, MAX_VIDEO_PIXELS

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


def _image_format(data: bytes, where: str, max_image_bytes: int) -> str | None:
    """Pillow's format name ('PNG', 'JPEG', ...) of `data`, or None when it is no image Pillow reads.
    APIError(400) when its header declares more than max_image_bytes decoded (`check_image_budget`) or more
    pixels than Pillow's bomb limit, before any pixel is decoded (`verify` only checks chunks and checksums)."""
    from PIL import Image, UnidentifiedImageError

    from lwm.utils.vision_io import MediaTooLarge, check_image_budget

    try:
        with Image.open(io.BytesIO(data)) as image:           # the header only
            check_image_budget(*image.size, image.mode, max_image_bytes, where)
            image.verify()
            return image.format
    except MediaTooLarge as e:
        raise bad_request(str(e), where, "media_too_large") from None
    except Image.DecompressionBombError as e:
        raise bad_request(f"{where}: {e}", where, "media_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def decode_media(data: bytes, where: str, size: int, max_n_frames: int, kind: str,
                 max_image_bytes: int = MAX_IMAGE_BYTES, max_video_pixels: int = MAX_VIDEO_PIXELS) -> np.ndarray:
    """Bytes of an image (kind 'image': PNG/JPEG) or of a video ('image' parts may carry an mp4 too; 'video')
    -> float32 (T, size, size, 3) in [-1, 1] by `lwm.utils.vision_io.load_frames`. APIError(400) when the bytes are
    neither, or when their header is over a budget (module docstring; max_image_bytes in bytes decoded,
    max_video_pixels in frames x width x height)."""
    from lwm.utils.vision_io import MediaTooLarge, load_frames

    fmt = _image_format(data, where, max_image_bytes)
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
            return load_frames(f.name, size, max_n_frames, max_image_bytes, max_video_pixels)
        except MediaTooLarge as e:
            text = str(e).replace(f"{f.name}: ", "")
            raise bad_request(f"{where}: {text}", where, "media_too_large") from None
        except (ValueError, OSError) as e:
            text = str(e).replace(f.name, "the data").replace(f.name.rsplit('/', 1)[-1], "the data")
            raise bad_request(f"{where}: cannot decode the media ({text})", where, "invalid_image") from None


def _looks_like_video(data: bytes) -> bool:
    """ISO media (mp4/mov: 'ftyp' at byte 4), Matroska/WebM, AVI or MPEG-TS by their magic bytes."""
    return (data[4:8] == b"ftyp" or data[:4] == b"\x1a\x45\xdf\xa3" or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")
            or (len(data) > 188 and data[0] == 0x47 and data[188] == 0x47))


def frames_from_parts(parts: Sequence[tuple[str, str, str]], size: int, max_n_frames: int,
                      allow_local: bool, max_image_bytes: int = MAX_IMAGE_BYTES,
                      max_video_pixels: int = MAX_VIDEO_PIXELS) -> np.ndarray:
    """Media parts of one message, [(kind 'image'|'video', url, where)], -> (T, size, size, 3) in [-1, 1].
    One part: its frames (a video is sampled to at most max_n_frames). Several parts: each is one frame of a
    video, in order (a video among several parts is refused); more than max_n_frames are thinned evenly
    (`lwm.utils.vision_io.sample_frame_indices`). Each part is held to the budgets (`decode_media`)."""
    from lwm.utils.vision_io import sample_frame_indices

    if len(parts) == 1:
        kind, url, where = parts[0]
        return decode_media(read_url(url, where, allow_local), where, size, max_n_frames, kind, max_image_bytes,
                            max_video_pixels)
    frames = []
    for kind, url, where in parts:
        data = read_url(url, where, allow_local)
        if kind == "video" or _looks_like_video(data):
            raise bad_request(f"{where}: a video cannot be one of several frames; send it as the message's only "
                              "media part", where)
        frames.append(decode_media(data, where, size, 1, kind, max_image_bytes, max_video_pixels)[0])
    keep = sample_frame_indices(len(frames), max_n_frames)
    return np.stack([frames[i] for i in keep])
