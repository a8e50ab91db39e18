"""Content-addressed image store: refs depend only on pixels, writes are atomic and idempotent."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foveate.errors import ImageError
from foveate.tools.images import load_image
from foveate.tools.store import ImageStore, default_store_root


def noise(width: int = 32, height: int = 24, seed: int = 0) -> Image.Image:
    """Random RGB pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reencode(image: Image.Image, fmt: str, **params: object) -> Image.Image:
    """Round-trip an image through an encoder and load_image."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return load_image(buffer.getvalue())


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    """A store in a fresh temporary directory."""
    return ImageStore(tmp_path / "images")


def test_put_is_idempotent_and_lays_out_files(store: ImageStore) -> None:
    image = noise()
    ref = store.put(image)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", ref)
    digest = ref.removeprefix("sha256:")
    expected = store.root / digest[:2] / f"{digest}.png"
    assert store.path(ref) == expected and expected.is_file()
    mtime = expected.stat().st_mtime_ns
    assert store.put(image.copy()) == ref
    assert expected.stat().st_mtime_ns == mtime  # Not rewritten.
    assert ref in store
    assert store.ref_for(image) == ref
    assert [p.name for p in expected.parent.iterdir()] == [expected.name]  # No temp files left behind.


def test_get_returns_identical_pixels(store: ImageStore) -> None:
    image = noise(17, 9)
    loaded = store.get(store.put(image))
    assert loaded.mode == "RGB" and loaded.size == (17, 9)
    assert loaded.tobytes() == image.tobytes()


def test_same_pixels_same_ref_regardless_of_encoding(store: ImageStore) -> None:
    from_jpeg = reencode(noise(), "JPEG", quality=80)  # Lossy: these decoded pixels are the reference.
    from_png = reencode(from_jpeg, "PNG", compress_level=9)
    from_png_fast = reencode(from_jpeg, "PNG", compress_level=0)
    assert from_png.tobytes() == from_jpeg.tobytes()
    assert store.put(from_jpeg) == store.put(from_png) == store.put(from_png_fast)
    # Opaque RGBA and RGB with the same colours are the same picture.
    assert store.put(from_jpeg.convert("RGBA")) == store.put(from_jpeg)


def test_different_pixels_or_shape_give_different_refs(store: ImageStore) -> None:
    image = noise(8, 6)
    changed = image.copy()
    changed.putpixel((0, 0), tuple(255 - c for c in image.getpixel((0, 0))))
    # Same bytes, different shape: the size header in the hash keeps these apart.
    reshaped = Image.frombytes("RGB", (6, 8), image.tobytes())
    assert len({store.put(image), store.put(changed), store.put(reshaped)}) == 3


def test_unknown_and_malformed_refs(store: ImageStore) -> None:
    unknown = "sha256:" + "0" * 64
    with pytest.raises(ImageError, match=f"unknown image ref {unknown}: not in the image store at"):
        store.get(unknown)
    for bad in ("sha256:xyz", "md5:" + "0" * 64, "sha256:" + "A" * 64, "../../etc/passwd"):
        with pytest.raises(ImageError, match="malformed image ref"):
            store.get(bad)
        assert bad not in store
    assert unknown not in store and 42 not in store


def test_corrupt_stored_file_is_an_image_error(store: ImageStore) -> None:
    ref = store.put(noise())
    path = store.path(ref)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        store.get(ref)


def test_arrays_round_trip(store: ImageStore) -> None:
    ref = store.put(noise())
    heat = np.random.default_rng(1).random((7, 5)).astype(np.float32)
    path = store.put_array(ref, "attention/layer 12", heat)
    assert path.parent == store.path(ref).parent  # Beside the image...
    assert path.name.startswith(ref.removeprefix("sha256:") + ".attention_layer_12-")  # ...with a safe name.
    loaded = store.get_array(ref, "attention/layer 12")
    assert loaded is not None and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, heat)
    store.put_array(ref, "attention/layer 12", heat * 2)  # Overwrite.
    np.testing.assert_array_equal(store.get_array(ref, "attention/layer 12"), heat * 2)


def test_array_keys_are_safe_and_distinct(store: ImageStore) -> None:
    ref = store.put(noise())
    keys = ["a/b", "a_b", "../../escape", "..", "x" * 300, "plain-key.v1"]
    paths = [store.put_array(ref, key, np.full(3, i)) for i, key in enumerate(keys)]
    assert len(set(paths)) == len(keys)
    for i, (key, path) in enumerate(zip(keys, paths, strict=True)):
        assert path.parent == store.path(ref).parent and len(path.name) < 200
        np.testing.assert_array_equal(store.get_array(ref, key), np.full(3, i))
    assert paths[-1].name.endswith(".plain-key.v1.npy")  # Already safe keys are kept verbatim.


def test_array_misses_and_errors(store: ImageStore) -> None:
    ref = store.put(noise())
    assert store.get_array(ref, "missing") is None
    with pytest.raises(ImageError, match="unknown image ref"):
        store.put_array("sha256:" + "1" * 64, "k", np.zeros(2))
    with pytest.raises(ValueError, match="object array"):
        store.put_array(ref, "k", np.array([object()]))
    with pytest.raises(ValueError, match="non-empty string"):
        store.put_array(ref, "", np.zeros(2))
    store.put_array(ref, "broken", np.zeros(2))
    store._array_path(ref, "broken").write_bytes(b"not npy")
    assert store.get_array(ref, "broken") is None  # A corrupt cache entry is a miss.


def test_concurrent_puts_of_the_same_image(store: ImageStore) -> None:
    image = noise(64, 64)
    refs: list[str] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        """Start all puts together to maximise overlap."""
        barrier.wait()
        refs.append(store.put(image))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(refs)) == 1 and len(refs) == 8
    files = list(store.root.rglob("*"))
    assert [p for p in files if p.is_file()] == [store.path(refs[0])]
    assert store.get(refs[0]).tobytes() == image.tobytes()


def test_default_root_follows_foveate_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOVEATE_HOME", str(tmp_path / "home"))
    assert default_store_root() == tmp_path / "home" / "images"
    assert ImageStore().root == tmp_path / "home" / "images"
    monkeypatch.delenv("FOVEATE_HOME")
    assert default_store_root() == Path.home() / ".cache" / "foveate" / "images"


def test_put_rejects_non_images(store: ImageStore) -> None:
    with pytest.raises(TypeError, match="expects a PIL image"):
        store.put(b"bytes")  # type: ignore[arg-type]


def test_a_derived_array_claimed_by_one_thread_is_awaited_by_the_others(tmp_path):
    """claim_array: the first claimant computes (None), the next waits and gets what it stored; a released claim
    passes the work on."""
    store = ImageStore(tmp_path / "images")
    ref = store.put(Image.new("RGB", (8, 8), "red"))
    assert store.claim_array(ref, "generic") is None  # this thread computes it
    got = []
    waiter = threading.Thread(target=lambda: got.append(store.claim_array(ref, "generic", timeout=30)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # waiting for the first claimant
    store.put_array(ref, "generic", np.ones((2, 2)))
    waiter.join(30)
    assert np.array_equal(got[0], np.ones((2, 2)))
    assert store.claim_array(ref, "other") is None
    passed_on = []
    second = threading.Thread(target=lambda: passed_on.append(store.claim_array(ref, "other", timeout=30)))
    second.start()
    store.release_array(ref, "other")  # the first claimant gave up: the waiter computes it
    second.join(30)
    assert passed_on == [None]
    store.release_array(ref, "other")
