"""Safe image loading: every way an image enters foveate goes through `load_image`.

`load_image` accepts a Pillow image, raw bytes, a path, a ``data:image/...;base64,`` URL or a bare base64
string, and always returns a new, fully decoded 8-bit RGB `PIL.Image.Image` "as a person sees it":

- EXIF orientation is applied, so boxes drawn by a model on the displayed image match our pixels.
- Transparency (RGBA, LA, palette or colour-key transparency) is composited on white, because VLM
  processors drop alpha and a transparent-black background would turn dark-on-transparent art invisible.
- 16-bit and 32-bit integer images are scaled by their real bit depth (``value >> 8`` for 16-bit), not
  clipped; float images in [0, 1] are scaled by 255, otherwise clipped to [0, 255].
- Animated images (GIF, APNG, WebP) contribute their first frame only: a VLM takes one still image.

Every failure a user can cause (missing file, not an image, truncated data, bad base64, too many pixels)
raises `foveate.errors.ImageError` with one readable message; Pillow exceptions never escape.

Pixel limit: we check ``width * height`` from the header against ``max_pixels`` *before* any pixel data is
decoded. Pillow's own decompression-bomb check also runs inside ``Image.open`` (warning above ~89 M pixels,
error above ~179 M), i.e. before ours could see the size; we suspend it only around the header parse, where
our check immediately replaces it, and restore it afterwards (see `_pillow_bomb_check_suspended`).
We never set ``ImageFile.LOAD_TRUNCATED_IMAGES``: a truncated file must fail, not silently load as grey.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from foveate.errors import ImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageSource",
    "image_from_data_url",
    "image_to_bytes",
    "image_to_data_url",
    "load_image",
    "to_rgb",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest ``width * height`` `load_image` accepts by default (about 7300 x 5500, i.e. a 40 MP photo).

Decoded RGB at this size is 120 MB; VLMs resize far below it anyway, so anything larger is much more
likely a decompression bomb or a mistake than a useful input. Pass ``max_pixels=`` to change it per call.
"""

ImageSource = Union[Image.Image, bytes, bytearray, memoryview, str, "os.PathLike[str]"]
"""Anything `load_image` accepts."""

# Raw base64 strings are accepted only when they are long (a short string is far more likely a mistyped
# path) and made of base64 characters; this keeps "image file not found" the error for typos.
_MIN_RAW_BASE64_CHARS = 64
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=\s]+")
_DATA_URL = re.compile(r"data:(?P<meta>[^,]*),(?P<payload>.*)", re.DOTALL)

# What Pillow's decoders raise on malformed input. Plugins differ (PNG raises SyntaxError for a bad chunk,
# JPEG OSError for truncation, TIFF struct.error/ValueError/KeyError for bad tags), so the list is broad;
# it wraps only the open/decode calls, never our own conversion code, so bugs there still surface.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

_bomb_lock = threading.Lock()
_bomb_depth = 0
_bomb_saved_limit: int | None = None


@contextmanager
def _pillow_bomb_check_suspended() -> Iterator[None]:
    """Suspend Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` check while a header is parsed.

    ``Image.MAX_IMAGE_PIXELS`` is a module global, so concurrent loads share a reference count: the first
    to enter saves the limit, the last to leave restores it, and no load ever restores a value that another
    thread is relying on being ``None``. The window covers only ``Image.open`` (header parsing, cheap).
    """
    global _bomb_depth, _bomb_saved_limit
    with _bomb_lock:
        if _bomb_depth == 0:
            _bomb_saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _bomb_depth += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_depth -= 1
            if _bomb_depth == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved_limit


def _shorten(text: str, limit: int = 120) -> str:
    """Cut long inputs (base64 blobs, odd paths) so error messages stay one readable line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_size(size: tuple[int, int], max_pixels: int | None, label: str) -> None:
    """Reject zero-area images and images above ``max_pixels``, using only the header's dimensions."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{label} has zero width or height ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{label} is too large: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} pixels (raise max_pixels to accept it)"
        )


def _scale_integer_to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer grey image to 8-bit "L" by its real bit depth (shift, never clip)."""
    array = np.asarray(image).astype(np.int64)
    if image.mode.startswith("I;16"):
        bits = 16
    else:
        # Mode "I" does not record the depth of the source; TIFF does (BitsPerSample, e.g. 12-bit medical
        # data), otherwise use the smallest standard depth that holds the maximum value.
        tags = getattr(image, "tag_v2", None)
        declared = tags.get(258) if tags is not None else None
        if isinstance(declared, tuple):
            declared = declared[0] if declared else None
        if isinstance(declared, int) and 8 <= declared <= 32:
            bits = declared
        else:
            peak = int(array.max(initial=0))
            bits = 8 if peak <= 0xFF else 16 if peak <= 0xFFFF else 32
    # Negative values (signed "I") have no meaning as intensities; treat them as black.
    scaled = np.clip(array, 0, None) >> (bits - 8)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def _scale_float_to_8bit(image: Image.Image) -> Image.Image:
    """Map a float image to 8-bit "L": [0, 1] data is scaled by 255, anything else is clipped to [0, 255]."""
    array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if array.size and array.min() >= 0.0 and array.max() <= 1.0:
        array = array * 255.0
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten an image with alpha onto an opaque white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Return a new 8-bit RGB copy of a loaded image of any Pillow mode (no EXIF handling, no size limits).

    Alpha and transparency are composited on white; 16/32-bit integer and float modes are scaled to 8-bit
    (see the module docstring); everything else uses Pillow's own conversion (e.g. CMYK, YCbCr, 1, L, P).
    """
    mode = image.mode
    if mode.startswith("I"):
        return _scale_integer_to_8bit(image).convert("RGB")
    if mode == "F":
        return _scale_float_to_8bit(image).convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or image.info.get("transparency") is not None
    try:
        if has_alpha:
            return _composite_on_white(image)
        return image.convert("RGB")
    except ValueError as exc:  # Pillow has no conversion path from this mode.
        raise ImageError(f"unsupported image mode {mode!r}: {exc}") from exc


def _decode(fp: str | IO[bytes], label: str, max_pixels: int | None) -> Image.Image:
    """Open ``fp``, check its header size, decode the first frame and return it as RGB."""
    try:
        with _pillow_bomb_check_suspended():
            opened = Image.open(fp)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label} is not a recognised image format") from exc
    except OSError as exc:
        if exc.errno is not None:  # A real I/O error (permissions, device), not a Pillow decoding complaint.
            raise ImageError(f"{label} could not be read: {exc.strerror or exc}") from exc
        raise ImageError(f"{label} is truncated or corrupt: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{label} is truncated or corrupt: {exc}") from exc

    with opened:
        _check_size(opened.size, max_pixels, label)
        try:
            # Decoding happens here; a truncated or corrupt stream raises instead of padding with grey.
            opened.load()
        except _DECODE_ERRORS as exc:
            raise ImageError(f"{label} is truncated or corrupt: {exc}") from exc
        return _finish(opened, label)


def _finish(image: Image.Image, label: str) -> Image.Image:
    """Apply EXIF orientation and convert to RGB; the result never aliases ``image``."""
    try:
        # Checking the tag first avoids exif_transpose's full copy for the common, unrotated case.
        needs_turn = image.getexif().get(ExifTags.Base.Orientation, 1) != 1
        oriented = ImageOps.exif_transpose(image) if needs_turn else image
    except _DECODE_ERRORS as exc:
        # Broken EXIF should not make good pixels unusable; keep the stored orientation instead.
        logger.warning("ignoring unreadable EXIF orientation in %s: %s", label, exc)
        oriented = image
    return to_rgb(oriented)


def _decode_base64(payload: str, label: str) -> bytes:
    """Strictly decode base64 (whitespace such as line wrapping is allowed and ignored)."""
    compact = "".join(payload.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"invalid base64 in {label}: {exc}") from exc


def _load_data_url(url: str, max_pixels: int | None) -> Image.Image:
    """Decode a ``data:[<mime>];base64,<payload>`` URL (the MIME type is ignored; content is sniffed)."""
    match = _DATA_URL.fullmatch(url.strip())
    if match is None:
        raise ImageError(f"malformed data URL (no comma separating header and data): {_shorten(url, 60)}")
    if "base64" not in match.group("meta").split(";"):
        raise ImageError("only base64 data URLs are supported (expected 'data:image/...;base64,...')")
    raw = _decode_base64(match.group("payload"), "image data URL")
    if not raw:
        raise ImageError("image data URL is empty")
    return _decode(io.BytesIO(raw), "image data URL", max_pixels)


def _load_path(path: Path, max_pixels: int | None) -> Image.Image:
    """Load an image file, giving missing, directory and empty files their own messages."""
    shown = str(path)
    try:
        if not path.exists():
            raise ImageError(f"image file not found: {shown}")
        if path.is_dir():
            raise ImageError(f"image path is a directory, not a file: {shown}")
        if path.stat().st_size == 0:
            raise ImageError(f"image file is empty (0 bytes): {shown}")
    except OSError as exc:  # e.g. permission denied on a parent directory, name too long.
        raise ImageError(f"cannot access image file {shown}: {exc.strerror or exc}") from exc
    return _decode(str(path), f"image file {shown}", max_pixels)


def _load_str(text: str, max_pixels: int | None) -> Image.Image:
    """Interpret a string as a data URL, an existing path, or raw base64 (in that order)."""
    if not text.strip():
        raise ImageError("image path is empty")
    if text.lstrip()[:5].lower() == "data:":
        return _load_data_url(text, max_pixels)
    path = Path(os.path.expanduser(text))
    try:
        is_path = path.exists()
    except (OSError, ValueError):  # Long base64 can exceed the OS name limit or contain NUL.
        is_path = False
    if is_path or len(text) < _MIN_RAW_BASE64_CHARS or _BASE64_CHARS.fullmatch(text) is None:
        return _load_path(path, max_pixels)
    raw = _decode_base64(text, "image string (not an existing file, so read as base64)")
    return _decode(io.BytesIO(raw), "base64 image string", max_pixels)


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``source`` into a new, fully decoded 8-bit RGB image, or raise `ImageError` saying why not.

    ``source`` may be a `PIL.Image.Image` (never modified), ``bytes``/``bytearray``/``memoryview``, a path
    (``str`` or ``os.PathLike``; ``~`` is expanded), a ``data:image/...;base64,...`` URL, or a bare base64
    string (used only when it is not an existing path, is at least 64 characters long and decodes strictly).
    ``max_pixels`` bounds ``width * height`` before decoding; ``None`` disables the bound.
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, "image")
        try:
            source.load()  # A lazily opened file may still fail here (truncated data).
        except _DECODE_ERRORS as exc:
            raise ImageError(f"image is truncated or corrupt: {exc}") from exc
        return _finish(source, "image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("image data is empty (0 bytes)")
        return _decode(io.BytesIO(bytes(source)), "image data", max_pixels)
    if isinstance(source, str):
        return _load_str(source, max_pixels)
    if isinstance(source, os.PathLike):
        return _load_path(Path(os.fspath(source)).expanduser(), max_pixels)
    raise TypeError(
        f"cannot load an image from {type(source).__name__}; expected a PIL image, bytes, a path, "
        "a data URL or a base64 string"
    )


def image_to_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    """Encode ``image`` in ``format`` (any Pillow writer); modes JPEG cannot store are flattened to RGB first."""
    fmt = "JPEG" if format.upper() == "JPG" else format.upper()  # Pillow only registers "JPEG".
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = to_rgb(image)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (KeyError, ValueError, OSError) as exc:
        raise ImageError(f"cannot encode a {image.mode} image as {format}: {exc}") from exc
    return buffer.getvalue()


def image_to_data_url(image: Image.Image, format: str = "PNG") -> str:
    """Encode ``image`` as a ``data:<mime>;base64,...`` URL, the form OpenAI-compatible chat APIs accept."""
    fmt = "JPEG" if format.upper() == "JPG" else format.upper()
    mime = Image.MIME.get(fmt, f"image/{fmt.lower()}")
    payload = base64.b64encode(image_to_bytes(image, fmt)).decode("ascii")
    return f"data:{mime};base64,{payload}"


def image_from_data_url(url: str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a base64 data URL into an RGB image (a strict front door to `load_image`)."""
    if not isinstance(url, str) or url.lstrip()[:5].lower() != "data:":
        raise ImageError(f"not a data URL (expected 'data:image/...;base64,...'): {_shorten(str(url), 60)}")
    return load_image(url, max_pixels=max_pixels)
