"""Content-addressed image store: graph state and traces hold ``"sha256:<hex>"`` refs, not pixels.

Keeping images out of state is what lets checkpointers persist every thread as small JSON/SQLite rows and
lets traces be rendered later. The ref is the SHA-256 of a *canonical* encoding (a short header with mode
and size, then the raw 8-bit RGB bytes), so identical pixels always give the same ref no matter which
file or encoder they came from, and the PNG written to disk can change encoder settings freely.

Layout under the root (default ``$FOVEATE_HOME/images``, else ``~/.cache/foveate/images``)::

    ab/abcdef....png            the image, lossless RGB PNG
    ab/abcdef....<key>.npy      derived arrays for that image (e.g. attention maps), see `put_array`

Every file is written to a temporary file in the same directory and moved into place with `os.replace`,
which is atomic on POSIX and Windows. Readers therefore never see a partial file, and concurrent `put`s of
the same image from several threads or processes are safe without locks: each writes identical bytes and
the last rename wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from foveate.errors import ImageError

from .images import load_image, to_rgb

__all__ = ["ImageRef", "ImageStore", "default_store_root"]

logger = logging.getLogger(__name__)

ImageRef = str
"""``"sha256:<64 lowercase hex digits>"``: the SHA-256 of an image's canonical RGB encoding."""

_REF = re.compile(r"sha256:([0-9a-f]{64})")
# A version tag in the hashed header lets a future canonical encoding never collide with this one.
_CANONICAL_TAG = b"foveate-image-v1"
# Array keys become part of a file name; anything outside this set is replaced.
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_MAX_KEY_CHARS = 80
# Level 1 is several times faster than the default 6 for ~10-20 % larger files; puts are on the hot path of
# agent runs (every crop is stored) while the store is a cache-like directory, so speed wins.
_PNG_COMPRESS_LEVEL = 1


def default_store_root() -> Path:
    """``$FOVEATE_HOME/images`` if ``FOVEATE_HOME`` is set, else ``~/.cache/foveate/images``."""
    home = os.environ.get("FOVEATE_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "foveate"
    return base / "images"


def _canonical_rgb(image: Image.Image) -> Image.Image:
    """The RGB image whose pixels are hashed and stored (alpha flattened on white, as `load_image` does)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"ImageStore.put expects a PIL image, got {type(image).__name__}; use load_image() first")
    try:
        image.load()  # A lazily opened file decodes here; truncation must be an ImageError, not OSError.
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"image is truncated or corrupt: {exc}") from exc
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    return to_rgb(image)


def _digest(rgb: Image.Image) -> str:
    """SHA-256 hex digest of the canonical encoding: tag, mode and size header, then raw RGB bytes."""
    width, height = rgb.size
    hasher = hashlib.sha256()
    hasher.update(_CANONICAL_TAG + f"\nRGB {width} {height}\n".encode("ascii"))
    hasher.update(rgb.tobytes())
    return hasher.hexdigest()


def _safe_key(key: str) -> str:
    """Make ``key`` a safe file-name component, keeping distinct keys distinct.

    Unsafe characters are replaced and leading dots stripped (no ``..`` or hidden files); if that changed
    the key or it is long, a short hash of the original key is appended so e.g. ``"a/b"`` and ``"a_b"``
    never share a file.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"array key must be a non-empty string, got {key!r}")
    cleaned = _UNSAFE_KEY_CHARS.sub("_", key).lstrip(".")
    if cleaned != key or len(cleaned) > _MAX_KEY_CHARS:
        suffix = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
        cleaned = f"{cleaned[:_MAX_KEY_CHARS]}-{suffix}"
    return cleaned


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file via a same-directory temp file, fsync and `os.replace`, so it appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            # Without fsync a crash soon after the rename can leave an empty file under the final name.
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


_claims: dict[str, threading.Event] = {}  # derived arrays being computed in this process (`claim_array`)
_claims_lock = threading.Lock()


class ImageStore:
    """A directory of images keyed by the SHA-256 of their pixels, plus per-image derived arrays."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        """Use ``root`` (created lazily on first write), or `default_store_root` when ``None``."""
        self.root = Path(root).expanduser() if root is not None else default_store_root()

    def __repr__(self) -> str:
        """Show the root so logs say which store is meant."""
        return f"ImageStore({str(self.root)!r})"

    def _hex(self, ref: ImageRef) -> str:
        """Validate a ref and return its hex digest."""
        match = _REF.fullmatch(ref) if isinstance(ref, str) else None
        if match is None:
            raise ImageError(f"malformed image ref {ref!r}: expected 'sha256:' followed by 64 lowercase hex digits")
        return match.group(1)

    def path(self, ref: ImageRef) -> Path:
        """Where the PNG for ``ref`` lives (whether or not it exists); `ImageError` if ``ref`` is malformed."""
        digest = self._hex(ref)
        return self.root / digest[:2] / f"{digest}.png"

    def __contains__(self, ref: object) -> bool:
        """Whether ``ref`` is stored; malformed refs and non-strings are simply not contained."""
        if not isinstance(ref, str) or _REF.fullmatch(ref) is None:
            return False
        return self.path(ref).is_file()

    def ref_for(self, image: Image.Image) -> ImageRef:
        """The ref `put` would return for ``image``, without writing anything."""
        return f"sha256:{_digest(_canonical_rgb(image))}"

    def put(self, image: Image.Image) -> ImageRef:
        """Store ``image``'s pixels as RGB and return its ref; storing the same pixels again is a no-op.

        The pixels are stored as given (converted to RGB like `load_image` does, but with no EXIF rotation):
        load files with `load_image` first so the stored image is the one a person sees.
        """
        rgb = _canonical_rgb(image)
        ref = f"sha256:{_digest(rgb)}"
        target = self.path(ref)
        if target.is_file():
            return ref
        try:
            _atomic_write(target, lambda handle: rgb.save(handle, format="PNG", compress_level=_PNG_COMPRESS_LEVEL))
        except OSError as exc:
            raise ImageError(f"cannot write image to store {self.root}: {exc.strerror or exc}") from exc
        return ref

    def get(self, ref: ImageRef) -> Image.Image:
        """Load the stored image for ``ref`` as a new RGB image; `ImageError` if malformed or unknown."""
        target = self.path(ref)
        if not target.is_file():
            raise ImageError(f"unknown image ref {ref}: not in the image store at {self.root}")
        # Stored images passed no size limit on the way in, so none is applied on the way out either.
        return load_image(target, max_pixels=None)

    def _array_path(self, ref: ImageRef, key: str) -> Path:
        """Where the ``.npy`` file for ``(ref, key)`` lives, beside the image."""
        digest = self._hex(ref)
        return self.root / digest[:2] / f"{digest}.{_safe_key(key)}.npy"

    def put_array(self, ref: ImageRef, key: str, array: np.ndarray) -> Path:
        """Store a derived array (e.g. an attention map) for a stored image under ``key``; returns its path.

        Overwrites any earlier array with the same key. Object arrays are refused (no pickles on disk).
        """
        if ref not in self:
            raise ImageError(f"unknown image ref {ref}: store the image before its derived arrays")
        target = self._array_path(ref, key)
        data = np.asarray(array)
        if data.dtype.hasobject:
            raise ValueError(f"cannot store an object array under key {key!r}; use a numeric dtype")
        _atomic_write(target, lambda handle: np.save(handle, data, allow_pickle=False))
        self.release_array(ref, key)  # callers waiting in claim_array find it now
        return target

    def claim_array(self, ref: ImageRef, key: str, timeout: float = 600.0) -> np.ndarray | None:
        """The array stored for ``(ref, key)``; when there is none, None, and the caller is to compute it: until
        it calls `put_array` (or `release_array`, giving up), other threads claiming the same key wait for it, so
        concurrent questions about one image compute a derived array (ViCrop's generic map) once. A wait longer
        than ``timeout`` seconds gives up waiting and lets the caller compute it too."""
        path = str(self._array_path(ref, key))
        while True:
            with _claims_lock:
                pending = _claims.get(path)
                if pending is None:
                    found = self.get_array(ref, key)
                    if found is None:
                        _claims[path] = threading.Event()
                    return found
            if not pending.wait(timeout):
                return None

    def release_array(self, ref: ImageRef, key: str) -> None:
        """End a `claim_array` claim without storing (the array turned out not to be needed)."""
        with _claims_lock:
            pending = _claims.pop(str(self._array_path(ref, key)), None)
        if pending is not None:
            pending.set()

    def get_array(self, ref: ImageRef, key: str) -> np.ndarray | None:
        """The array stored for ``(ref, key)``, or ``None`` if there is none (or the file is unreadable).

        An unreadable file is treated as a cache miss, because derived data can always be recomputed.
        """
        target = self._array_path(ref, key)
        try:
            return np.load(target, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as exc:
            logger.warning("ignoring unreadable cached array %s: %s", target, exc)
            return None


class DecodedImages:
    """The image store seen through a small in-process cache of decoded images.

    A ViCrop run (agents.vicrop) reads the same image in every node (and the crop it just wrote); refs are content
    addresses, so a decoded image can be shared safely (nothing here mutates one). Everything else goes to the
    store. The cache belongs to the store object (a weak-keyed table) and holds at most `size` images.
    """

    size = 16
    _caches: weakref.WeakKeyDictionary[ImageStore, OrderedDict[str, Image.Image]] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, store: ImageStore) -> None:
        self.store = store
        with self._lock:
            self._images = self._caches.setdefault(store, OrderedDict())

    def get(self, ref: str) -> Image.Image:
        with self._lock:
            if ref in self._images:
                self._images.move_to_end(ref)
                return self._images[ref]
        image = self.store.get(ref)
        self._remember(ref, image)
        return image

    def put(self, image: Image.Image) -> str:
        ref = self.store.put(image)
        self._remember(ref, image)
        return ref

    def _remember(self, ref: str, image: Image.Image) -> None:
        with self._lock:
            self._images[ref] = image
            while len(self._images) > self.size:
                self._images.popitem(last=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def decoded(store: ImageStore) -> DecodedImages:
    """``store`` behind its shared cache of decoded images (itself when it already is)."""
    return store if isinstance(store, DecodedImages) else DecodedImages(store)
