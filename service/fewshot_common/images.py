"""Image bytes -> model input: decoding, request limits and preprocessing, in one place.

Embed, Classify and example uploads all go through :func:`load_batch`, so every transport refuses
the same inputs with the same messages. Nothing here depends on the model runtime.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .cancellation import CancellationCheck, raise_if_cancelled
from .errors import FewshotError, ImageError, InvalidInput, TooLarge
from .image_formats import DEFAULT_FORMATS, check_format, normalise_formats
from .jpeg_scans import count_jpeg_scans
from .modelmeta import Preprocess

MiB = 1024 * 1024

# Transparent pixels are composited onto white: it is what image viewers show, and what a
# photographed object on a plain sheet looks like.
ALPHA_BACKGROUND = (255, 255, 255)

# JPEGs are decoded at reduced scale down to this many times the resize size, so the final
# antialiased resize still averages over several decoded pixels per output pixel.
DRAFT_FACTOR = 2

# Up to this aspect ratio the whole image is resized, then cropped (exactly torchvision's way).
_MAX_ASPECT_RESIZED = 16

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


# Rows converted at a time from 16/32-bit and float modes, so the temporaries stay small.
_CONVERT_ROWS_PIXELS = 1 << 20

# Bytes per pixel of Pillow's in-memory modes (8-bit multi-band modes are stored 4 bytes a pixel).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


@dataclass(frozen=True)
class ImageLimits:
    """Per-request limits. A request over any of them is refused with :class:`errors.TooLarge`.

    Together they are the decode budget: ``max_jpeg_scans`` bounds a progressive JPEG's CPU
    time (each scan re-walks the whole image), ``max_decoded_bytes`` one image's decoded
    memory, and ``max_request_pixels`` the decoding work of one request summed over its images.
    """

    max_image_bytes: int = 20 * MiB
    max_pixels: int = 40_000_000
    max_images: int = 64
    # libjpeg writes 10 scans for a progressive JPEG; mozjpeg and Photoshop stay well under 64.
    max_jpeg_scans: int = 64
    max_decoded_bytes: int = 256 * MiB
    max_request_pixels: int = 200_000_000
    # The file formats accepted, told from their magic numbers (image_formats.py).
    formats: tuple[str, ...] = DEFAULT_FORMATS
    # The isolated decode's hard limits (decode_worker.py), whatever a decoder does: CPU seconds
    # per image, and memory a worker may take beyond its own (RLIMIT_AS). Over either: 413.
    max_decode_cpu_s: int = 2
    max_decode_memory: int = 512 * MiB

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", normalise_formats(self.formats))
        values = (
            self.max_image_bytes,
            self.max_pixels,
            self.max_images,
            self.max_jpeg_scans,
            self.max_decoded_bytes,
            self.max_request_pixels,
            self.max_decode_cpu_s,
            self.max_decode_memory,
        )
        if min(values) <= 0:
            raise ValueError(f"image limits must be positive, got {self}")


def decode_image(
    data: bytes,
    index: int,
    limits: ImageLimits = ImageLimits(),
    *,
    min_short_side: int | None = None,
) -> Image.Image:
    """Decode one encoded image file into an RGB :class:`PIL.Image.Image`.

    The pixel count is checked from the header, *before* any pixel is decoded, so a
    decompression bomb costs nothing. Animated images give their first frame; EXIF rotation is
    applied; alpha is composited onto :data:`ALPHA_BACKGROUND`; 16-bit images are scaled to 8 bits.

    With ``min_short_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling) as long as its shorter side stays at least that long: libjpeg then skips most of the
    inverse DCT work of a large photo, and the model, which sees a few dozen pixels, cannot tell.

    The rest of the decode budget is checked before decoding too: a JPEG's scan count (walked
    from its markers) and the decoded image's memory (size x bytes per pixel of its mode).
    """
    return open_image(data, index, limits, min_short_side=min_short_side).decode()


@dataclass
class OpenedImage:
    """A header-checked image whose pixels are not decoded yet (see :func:`open_image`)."""

    image: Image.Image
    index: int
    # Width and height as the file states them: a JPEG's ``image.size`` is its reduced decode
    # size once ``min_short_side`` picked one.
    source_size: tuple[int, int] = (0, 0)

    @property
    def decoded_pixels(self) -> int:
        """Pixels the decode will produce (after any JPEG DCT scaling)."""
        return self.image.width * self.image.height

    def decode(self) -> Image.Image:
        """Decode the pixels (first frame only for animations) into an RGB image."""
        index = self.index
        try:
            self.image.load()  # first frame only for animations; raises on truncated data
            # In place: otherwise Pillow returns a copy of every image that needs no rotation.
            ImageOps.exif_transpose(self.image, in_place=True)
            return _to_rgb(self.image)
        except Image.DecompressionBombError as exc:
            raise TooLarge(f"image {index}: too many pixels ({exc})") from None
        except MemoryError:
            # Under the decode worker's RLIMIT_AS, an allocation beyond the budget lands here.
            raise TooLarge(f"image {index}: decoding needs more memory than the limit") from None
        except Exception as exc:
            raise _corrupt(index, exc) from None


def open_image(
    data: bytes,
    index: int,
    limits: ImageLimits = ImageLimits(),
    *,
    min_short_side: int | None = None,
) -> OpenedImage:
    """Parse the header and check every limit that can be checked before decoding pixels."""
    if not data:
        raise ImageError(index, "empty image data")
    if len(data) > limits.max_image_bytes:
        raise TooLarge(
            f"image {index}: {len(data)} bytes exceeds the limit of {limits.max_image_bytes} bytes"
        )
    file_format = check_format(data, index, limits.formats)  # before any decoder sees a byte
    try:
        # The same allowlist again, so no other plugin's parser runs even if the sniff is fooled.
        img = Image.open(io.BytesIO(data), formats=limits.formats)
    except MemoryError:
        raise TooLarge(f"image {index}: decoding needs more memory than the limit") from None
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires first for images far beyond its default limit.
        raise TooLarge(f"image {index}: too many pixels ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(index, "not a decodable image (unknown or unsupported format)") from None
    except Exception as exc:  # any failure to parse untrusted bytes is the client's bad image
        raise _corrupt(index, exc) from None

    width, height = img.size
    if width * height > limits.max_pixels:
        raise TooLarge(
            f"image {index}: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{limits.max_pixels} pixels"
        )
    if width == 0 or height == 0:
        raise ImageError(index, f"image has no pixels ({width}x{height})")
    if file_format == "JPEG":  # by its bytes: Pillow names some JPEGs MPO
        scans = count_jpeg_scans(data, stop_after=limits.max_jpeg_scans)
        if scans > limits.max_jpeg_scans:
            raise TooLarge(
                f"image {index}: a JPEG with more than {limits.max_jpeg_scans} scans costs too "
                "much to decode (encoders write at most a dozen); re-encode it"
            )
    try:
        if min_short_side is not None and img.format == "JPEG":
            scale = min_short_side / min(width, height)
            if scale < 1:
                img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))
    except Exception as exc:
        raise ImageError(index, f"truncated or corrupt image data ({_reason(exc)})") from None
    decoded_bytes = img.width * img.height * _MODE_BYTES.get(img.mode, 4)
    if decoded_bytes > limits.max_decoded_bytes:
        raise TooLarge(
            f"image {index}: decoding {img.width}x{img.height} in mode {img.mode} needs "
            f"{decoded_bytes} bytes, over the limit of {limits.max_decoded_bytes} bytes"
        )
    return OpenedImage(img, index, (width, height))


def _corrupt(index: int, exc: Exception) -> FewshotError:
    """A decoder's failure: the image's fault, unless it is an allocation refused by the decode
    worker's memory limit (libwebp reports those as a decoder it could not create)."""
    if isinstance(exc, OSError) and "could not create decoder object" in str(exc):
        return TooLarge(f"image {index}: decoding needs more memory than the limit")
    return ImageError(index, f"truncated or corrupt image data ({_reason(exc)})")


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see :func:`decode_image` for the policy)."""
    if img.mode.startswith("I;16") or img.mode == "I" or img.mode == "F":
        img = Image.fromarray(_wide_to_8bit(img), mode="L")
    if img.mode == "P":
        # Palette images may carry transparency in their palette; expand it to RGBA first.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # no copy of an RGBA image
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _wide_to_8bit(img: Image.Image) -> np.ndarray:
    """16/32-bit integer modes scale by 1/257 (rounded); float mode clips and truncates.

    Pillow's own I -> L conversion clips at 255, which turns 16-bit photos white. Converted a
    band of rows at a time in the source dtype (round(x / 257) == (x + 128) // 257 for x >= 0),
    so the temporaries stay a few MB where whole-image float64 copies took GBs.
    """
    wide = np.asarray(img)  # one copy in the source dtype (2 or 4 bytes a pixel)
    out = np.empty(wide.shape, dtype=np.uint8)
    rows = max(1, _CONVERT_ROWS_PIXELS // max(1, img.width))
    for top in range(0, wide.shape[0], rows):
        band = wide[top : top + rows]
        if img.mode == "F":
            out[top : top + rows] = np.clip(band, 0, 255)
        else:
            scaled = np.clip(band, 0, 65535).astype(np.int32)
            scaled += 128
            scaled //= 257
            out[top : top + rows] = scaled
    return out


@functools.lru_cache(maxsize=16)
def _level_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``[3, 256]`` float32: the normalised value of each 8-bit level in each channel, computed
    with the same float32 operations as normalising the pixels one by one (so identical to it)."""
    levels = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
    mean_f = np.asarray(mean, dtype=np.float32)[:, None]
    std_f = np.asarray(std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean_f) / std_f


def preprocess(img: Image.Image, pre: Preprocess, out: np.ndarray | None = None) -> np.ndarray:
    """RGB image -> float32 ``[3, S, S]``: shorter side to ``resize_size``, centre crop, normalise.

    Sizes are rounded as torchvision's ``Resize(int)`` + ``CenterCrop`` do, so the server sees
    what the trainer's evaluation transform sees (bit for bit). For extreme aspect ratios only
    the cropped region is resampled (Pillow's ``box``; edge pixels may differ by a few levels),
    because the full resized image could be huge: 1 x 10,000,000 would become 36 x 360 M.
    """
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = pre.resize_size, int(pre.resize_size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    crop = pre.input_size
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    resample = _RESAMPLE[pre.interpolation]
    if new_long <= _MAX_ASPECT_RESIZED * new_short:
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), resample)
        if img.size != (crop, crop):  # a square image at the input size needs no crop (a copy)
            img = img.crop((left, top, left + crop, top + crop))
    else:
        scale_x, scale_y = width / new_w, height / new_h
        box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
        img = img.resize((crop, crop), resample, box=box)

    # One table lookup per pixel, written channel-first straight into ``out`` (a row of the
    # request's batch): a quarter of the time of converting, scaling, normalising and transposing.
    rgb = np.asarray(img)
    table = _level_table(tuple(pre.mean), tuple(pre.std))
    if out is None:
        out = np.empty((3, crop, crop), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], rgb[:, :, channel], out=out[channel])
    return out


def load_batch(
    images: Sequence[bytes],
    pre: Preprocess,
    limits: ImageLimits = ImageLimits(),
    cancellation: CancellationCheck | None = None,
    before_step: Callable[[int], None] | None = None,
    on_open: Callable[[OpenedImage], None] | None = None,
) -> np.ndarray:
    """Decode and preprocess a request's images into one ``[N, 3, S, S]`` float32 array.

    Fails on the first bad image, naming its 0-based index in the request. Every header is
    checked before any pixel is decoded, so a request over its pixel budget costs nothing; a
    ``cancellation`` is checked before each decode. ``before_step(index)`` is called before each
    image's header is parsed and before it is decoded: the decode worker charges the CPU time of
    both to that image's budget there. ``on_open`` sees each image once its header is checked,
    before its pixels are decoded (in that image's header step).
    """
    if len(images) == 0:
        raise InvalidInput("the request has no images")
    if len(images) > limits.max_images:
        raise TooLarge(f"{len(images)} images in one request exceeds the limit of {limits.max_images}")
    opened = []
    for index, data in enumerate(images):
        if before_step is not None:
            before_step(index)
        opened.append(open_image(data, index, limits, min_short_side=DRAFT_FACTOR * pre.resize_size))
        if on_open is not None:
            on_open(opened[-1])
    total = sum(image.decoded_pixels for image in opened)
    if total > limits.max_request_pixels:
        raise TooLarge(
            f"the request's images decode to {total} pixels in all, over the limit of "
            f"{limits.max_request_pixels} per request: send fewer or smaller images per request"
        )
    batch = np.empty((len(images), 3, pre.input_size, pre.input_size), dtype=np.float32)
    for image in opened:
        raise_if_cancelled(cancellation, f"decoding image {image.index}")
        if before_step is not None:
            before_step(image.index)
        preprocess(image.decode(), pre, out=batch[image.index])
    return batch
