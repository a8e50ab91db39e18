"""Safe image loading: a battery of bad and unusual images, each built in tmp_path with Pillow itself."""

from __future__ import annotations

import base64
import io
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from foveate.errors import ImageError
from foveate.tools.images import (
    DEFAULT_MAX_PIXELS,
    image_from_data_url,
    image_to_bytes,
    image_to_data_url,
    load_image,
    to_rgb,
)


def noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """Random RGB pixels: incompressible, so a cut file really loses pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """Encode with Pillow into bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit all-black PNG of any size, streamed through zlib so huge sizes cost ~no memory.

    Pillow would need width*height bytes to build such an image in memory, so we write the chunks directly.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        """One PNG chunk: length, type, data, CRC."""
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)  # Filter byte 0, then packed 1-bit pixels.
    compressor = zlib.compressobj(9)
    rows_per_block = max(1, 4_000_000 // len(row))
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    """Write bytes to tmp_path/name and return the path."""
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_raises_instead_of_loading_grey(tmp_path: Path, fmt: str) -> None:
    data = encode(noise(), fmt)
    path = write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # We must never switch it on.


@pytest.mark.parametrize("keep", [12, 30])
def test_file_cut_inside_header_raises(tmp_path: Path, keep: int) -> None:
    path = write(tmp_path, "header.png", encode(noise(), "PNG")[:keep])
    with pytest.raises(ImageError, match="image file .*header.png"):
        load_image(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.png", b"")
    with pytest.raises(ImageError, match=r"image file is empty \(0 bytes\): .*empty.png"):
        load_image(path)
    with pytest.raises(ImageError, match="image data is empty"):
        load_image(b"")


def test_text_file_renamed_png(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.png", b"just some notes, definitely not an image\n" * 4)
    with pytest.raises(ImageError, match="is not a recognised image format"):
        load_image(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match=f"image file not found: {missing}"):
        load_image(missing)
    with pytest.raises(ImageError, match="image file not found: relative/typo.jpg"):
        load_image("relative/typo.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="image path is empty"):
        load_image("")


def test_unsupported_source_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="cannot load an image from int"):
        load_image(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- size limits


def test_one_by_one_image_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "dot.png", encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    image = load_image(path)
    assert image.size == (1, 1) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (10, 200, 30)


def test_pixel_limit_is_checked_from_the_header(tmp_path: Path) -> None:
    path = write(tmp_path, "wide.png", blank_png(2000, 1500))
    with pytest.raises(ImageError, match=r"2000x1500 = 3,000,000 pixels exceeds the limit of 1,000,000"):
        load_image(path, max_pixels=1_000_000)
    assert load_image(path, max_pixels=3_000_000).size == (2000, 1500)  # The limit is inclusive.


@pytest.mark.parametrize("side", [10_000, 20_000])  # Above Pillow's warning (89 M) and error (179 M) limits.
def test_huge_image_rejected_by_default_limit_before_pillow(tmp_path: Path, side: int) -> None:
    data = blank_png(side, side)
    assert len(data) < 200_000  # Cheap to build; decoding it would need hundreds of MB.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # A DecompressionBombWarning would mean Pillow's check ran first.
        with pytest.raises(ImageError, match=f"{side}x{side} = .* exceeds the limit of 40,000,000 pixels"):
            load_image(data)
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # Pillow's own limit is restored afterwards.


def test_zero_sized_pil_image_is_rejected() -> None:
    with pytest.raises(ImageError, match=r"zero width or height \(0x5\)"):
        load_image(Image.new("RGB", (0, 5)))


def test_pixel_limit_applies_to_pil_images_too() -> None:
    with pytest.raises(ImageError, match="exceeds the limit of 100 pixels"):
        load_image(Image.new("RGB", (20, 20)), max_pixels=100)


# ---------------------------------------------------------------------------------------------- conversions


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # No cyan, full magenta + yellow: red.
    path = write(tmp_path, "cmyk.jpg", encode(cmyk, "JPEG", quality=95))
    image = load_image(path)
    assert image.mode == "RGB"
    r, g, b = image.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_16bit_png_scales_by_bit_depth(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    path = write(tmp_path, "deep.png", encode(source, "PNG"))
    image = load_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(5)] == [0, 0, 1, 128, 255]


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16B", [0, 32768, 65535], [0, 128, 255]),
        ("I", [0, 32768, 65535], [0, 128, 255]),  # Depth inferred from the peak value: 16-bit.
        ("I", [0, 100, 255], [0, 100, 255]),  # Peak fits in 8 bits: already 8-bit data.
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # [0, 1] floats are scaled...
        ("F", [-5.0, 100.0, 300.0], [0, 100, 255]),  # ...anything else is clipped.
    ],
)
def test_high_bit_depth_modes(mode: str, values: list[float], expected: list[int]) -> None:
    source = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        source.putpixel((x, 0), value)
    image = load_image(source)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(len(values))] == [(v, v, v) for v in expected]


def test_rgba_is_composited_on_white() -> None:
    source = Image.new("RGBA", (3, 1))
    source.putpixel((0, 0), (255, 0, 0, 0))  # Fully transparent red: white.
    source.putpixel((1, 0), (255, 0, 0, 255))  # Opaque red stays red.
    source.putpixel((2, 0), (0, 0, 0, 128))  # Half-transparent black: mid grey.
    image = load_image(encode(source, "PNG"))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in image.getpixel((2, 0)))


def test_palette_with_transparency_is_composited_on_white() -> None:
    source = Image.new("P", (2, 1), 0)
    source.putpalette([0, 0, 255, 0, 255, 0])  # Index 0 blue, index 1 green.
    source.putpixel((1, 0), 1)
    data = encode(source, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    image = load_image(data)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 255, 0)


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("LA", (100, 0), (255, 255, 255)),
        ("LA", (100, 255), (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
        ("L", 7, (7,) * 3),
    ],
)
def test_grey_modes(mode: str, color: object, expected: tuple[int, int, int]) -> None:
    assert load_image(Image.new(mode, (2, 2), color)).getpixel((1, 1)) == expected


@pytest.mark.parametrize(("fmt", "params"), [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_image_uses_first_frame(fmt: str, params: dict[str, object]) -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert load_image(data).getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # Red marker in the stored top-left corner.
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: display = stored rotated 90 degrees clockwise.
    path = write(tmp_path, "rotated.jpg", encode(stored, "JPEG", quality=95, exif=exif))
    image = load_image(path)
    assert image.size == (20, 40)  # Width and height swap.
    # Rotating clockwise moves the top-left corner to the top-right.
    r, g, b = image.getpixel((16, 3))
    assert r > 200 and g < 60 and b < 60
    assert image.getpixel((3, 3)) == pytest.approx((255, 255, 255), abs=8)


def test_caller_image_is_not_modified_or_returned() -> None:
    source = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image = load_image(source)
    assert image is not source and source.mode == "RGBA"
    assert load_image(image) is not image


# ---------------------------------------------------------------------------------------------- encodings


def test_bytes_bytearray_and_path_sources(tmp_path: Path) -> None:
    source = noise(9, 7)
    data = encode(source, "PNG")
    path = write(tmp_path, "n.png", data)
    for item in (data, bytearray(data), memoryview(data), path, str(path)):
        assert load_image(item).tobytes() == source.tobytes()


def test_data_url_round_trip() -> None:
    source = noise(13, 11)
    url = image_to_data_url(source)
    assert url.startswith("data:image/png;base64,")
    assert load_image(url).tobytes() == source.tobytes()
    assert image_from_data_url(url).tobytes() == source.tobytes()
    jpeg_url = image_to_data_url(source, "jpg")
    assert jpeg_url.startswith("data:image/jpeg;base64,")
    assert image_from_data_url(jpeg_url).size == (13, 11)


def test_raw_base64_round_trip() -> None:
    source = noise(13, 11)
    text = base64.b64encode(encode(source, "PNG")).decode()
    assert load_image(text).tobytes() == source.tobytes()
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # MIME-style line wrapping.
    assert load_image(wrapped).tobytes() == source.tobytes()


def test_invalid_base64() -> None:
    with pytest.raises(ImageError, match="invalid base64 in image data URL"):
        load_image("data:image/png;base64,iVBORw0KGgo!!!")
    with pytest.raises(ImageError, match="invalid base64 in image string"):
        load_image("A" * 65)  # Long, base64 alphabet, not a path, but bad padding.
    with pytest.raises(ImageError, match="only base64 data URLs"):
        load_image("data:image/png,rawpixels")
    with pytest.raises(ImageError, match="not a data URL"):
        image_from_data_url("iVBORw0KGgo=")


def test_valid_base64_that_is_not_an_image() -> None:
    text = base64.b64encode(b"hello world, this is text and not a picture at all!").decode()
    with pytest.raises(ImageError, match="base64 image string is not a recognised image format"):
        load_image(text)


def test_image_to_bytes_flattens_alpha_for_jpeg_and_wraps_errors() -> None:
    data = image_to_bytes(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "JPEG")
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    assert load_image(data).getpixel((2, 2)) == pytest.approx((255, 255, 255), abs=2)
    assert Image.open(io.BytesIO(image_to_bytes(Image.new("RGB", (4, 4)), "jpg"))).format == "JPEG"
    with pytest.raises(ImageError, match="cannot encode"):
        image_to_bytes(Image.new("RGB", (4, 4)), "NOT-A-FORMAT")


def test_to_rgb_returns_new_rgb_image() -> None:
    source = Image.new("RGB", (2, 2), (1, 2, 3))
    converted = to_rgb(source)
    assert converted is not source and converted.getpixel((0, 0)) == (1, 2, 3)


def test_concurrent_loads_restore_pillow_limit() -> None:
    # The suspension of Pillow's global limit is reference-counted across threads; after a burst of
    # overlapping loads (some rejected by our limit) the original value must be back.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    good, huge = encode(noise(16, 16), "PNG"), blank_png(8000, 8000)
    errors: list[BaseException] = []

    def worker(data: bytes) -> None:
        """Load repeatedly, recording any exception that is not an ImageError."""
        for _ in range(20):
            try:
                load_image(data, max_pixels=1_000_000)
            except ImageError:
                pass
            except BaseException as exc:  # Anything else is a bug.
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(good if i % 2 else huge,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert pillow_limit == Image.MAX_IMAGE_PIXELS
