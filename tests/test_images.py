"""Decoding, limits and preprocessing of request images (fewshot_common.images)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fewshot_common.errors import ImageError, InvalidInput, TooLarge
from fewshot_common.images import ImageLimits, decode_image, load_batch, preprocess
from fewshot_common.modelmeta import IMAGENET_MEAN, IMAGENET_STD, Preprocess

import image_samples as samples

PRE = Preprocess(input_size=32, resize_size=36)


def centre_pixel(img: Image.Image) -> tuple[int, int, int]:
    return img.getpixel((img.width // 2, img.height // 2))


@pytest.mark.parametrize("name", sorted(samples.awkward_images()))
def test_awkward_modes_decode_to_rgb(name: str) -> None:
    img = decode_image(samples.awkward_images()[name], 0, ImageLimits())
    assert img.mode == "RGB"
    assert img.size[0] > 0 and img.size[1] > 0


def test_mode_conversions_keep_the_colours() -> None:
    limits = ImageLimits()
    assert centre_pixel(decode_image(samples.grey_png(), 0, limits)) == (100, 100, 100)
    # 16-bit mid-grey must stay mid-grey (Pillow's own conversion would clip it to white).
    assert centre_pixel(decode_image(samples.sixteen_bit_png(128 * 257), 0, limits)) == (128, 128, 128)
    assert centre_pixel(decode_image(samples.palette_png(), 0, limits)) == (0, 128, 0)
    red, green, blue = centre_pixel(decode_image(samples.cmyk_jpeg(), 0, limits))
    assert red > 200 and green < 60 and blue < 60
    # Transparency is composited onto white.
    assert centre_pixel(decode_image(samples.transparent_png(), 0, limits)) == (255, 255, 255)
    assert centre_pixel(decode_image(samples.transparent_palette_gif(), 0, limits)) == (255, 255, 255)
    # 30 grey at alpha 128 over white: about (30 * 128 + 255 * 127) / 255.
    grey = centre_pixel(decode_image(samples.grey_alpha_png(), 0, limits))
    assert grey[0] == grey[1] == grey[2] and abs(grey[0] - 142) <= 1
    # An animation gives its first frame (red), not a later one (blue).
    assert centre_pixel(decode_image(samples.animated_gif(), 0, limits)) == (255, 0, 0)


def test_exif_rotation_is_applied() -> None:
    img = Image.new("RGB", (60, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    data = samples.encode(img, "JPEG", exif=exif.tobytes())
    assert decode_image(data, 0, ImageLimits()).size == (20, 60)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"this is not an image", "not a decodable image"),
        (samples.solid_png((1, 2, 3))[:-30], "truncated"),
        (samples.encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:200], "truncated"),
    ],
    ids=["empty", "garbage", "truncated-png", "truncated-jpeg"],
)
def test_bad_images_name_their_index(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(data, 7, ImageLimits())
    assert caught.value.index == 7
    assert str(caught.value).startswith("image 7: ")
    assert reason in str(caught.value)


def test_too_many_bytes() -> None:
    data = samples.noise_png(0, (64, 64))
    with pytest.raises(TooLarge, match=r"image 2: \d+ bytes exceeds the limit of 1000 bytes"):
        decode_image(data, 2, ImageLimits(max_image_bytes=1000))


def test_too_many_pixels_is_refused_from_the_header() -> None:
    # 8000 x 8000 = 64 M pixels: over our 40 M default, under Pillow's own bomb limits. The file
    # holds no pixel data, so only a check made before decoding can report "too many pixels".
    with pytest.raises(TooLarge, match="image 0: 8000x8000 = 64000000 pixels exceeds"):
        decode_image(samples.png_header_only(8000, 8000), 0, ImageLimits())
    with pytest.raises(TooLarge, match="image 1: 100x100 = 10000 pixels exceeds the limit of 9999"):
        decode_image(samples.solid_png((0, 0, 0), (100, 100)), 1, ImageLimits(max_pixels=9999))


def test_decompression_bomb_beyond_pillows_limit_is_too_large() -> None:
    with pytest.raises(TooLarge, match="image 3: too many pixels"):
        decode_image(samples.png_header_only(60_000, 60_000), 3, ImageLimits(max_pixels=10**10))


@pytest.mark.parametrize(
    "height, width, resize, crop",
    [
        (50, 77, 36, 32),  # resized, then centre-cropped
        (64, 64, 96, 96),  # the shipped model's 64-px case: resized straight to the input (no crop)
        (32, 32, 32, 32),  # already the input size: neither
    ],
)
def test_preprocess_matches_torchvision_eval_transform(
    height: int, width: int, resize: int, crop: int
) -> None:
    """Same sizes, interpolation and normalisation as the trainer's eval transform."""
    from torchvision import transforms

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    reference = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(img).numpy()
    ours = preprocess(img, Preprocess(input_size=crop, resize_size=resize))
    assert ours.shape == (3, crop, crop) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_every_8_bit_level_normalises_exactly_as_the_per_pixel_formula() -> None:
    """The lookup table the server normalises with equals converting, scaling and normalising each
    pixel in float32, bit for bit, for all 256 levels of each channel, and writes into ``out``."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([levels, levels[::-1], levels.T], axis=-1)
    same_size = Preprocess(input_size=16, resize_size=16)
    pixels = np.asarray(rgb, dtype=np.float32) * np.float32(1.0 / 255.0)
    mean, std = (np.asarray(v, dtype=np.float32) for v in (IMAGENET_MEAN, IMAGENET_STD))
    expected = ((pixels - mean) / std).transpose(2, 0, 1)
    out = np.zeros((2, 3, 16, 16), dtype=np.float32)
    returned = preprocess(Image.fromarray(rgb), same_size, out=out[1])
    assert returned is out[1] or np.shares_memory(returned, out)
    np.testing.assert_array_equal(out[1], expected)
    assert not out[0].any()  # only its own row was written


@pytest.mark.parametrize("size", [(20_000, 1), (3, 5_000)])
def test_extreme_aspect_ratios_resample_only_the_crop_yet_equal_resize_then_crop(
    size: tuple[int, int],
) -> None:
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    width, height = size
    short = min(size)
    full = (36, int(36 * height / short)) if width <= height else (int(36 * width / short), 36)
    resized = img.resize(full, Image.Resampling.BICUBIC)
    left, top = int(round((full[0] - 32) / 2.0)), int(round((full[1] - 32) / 2.0))
    reference = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255.0
    reference = ((reference - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    # Pillow filters the box's edge pixels differently (up to ~15 of 255 levels in the last
    # column when upscaling 12x); the rest agrees to within rounding.
    level = 1 / 255 / min(IMAGENET_STD)
    difference = np.abs(preprocess(img, PRE) - reference)
    assert difference.max() < 20 * level and difference.mean() < level


def test_large_jpegs_decode_at_reduced_scale_with_the_same_result() -> None:
    rng = np.random.default_rng(4)
    smooth = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    photo = smooth.resize((1600, 1200), Image.Resampling.BICUBIC)
    jpeg, png = samples.encode(photo, "JPEG", quality=90), samples.encode(photo, "PNG")
    # DCT scaling picks 1/8: 150 pixels is still >= 72 = 2 x resize_size.
    assert decode_image(jpeg, 0, ImageLimits(), min_short_side=72).size == (200, 150)
    assert decode_image(jpeg, 0, ImageLimits(), min_short_side=400).size == (800, 600)
    assert decode_image(png, 0, ImageLimits(), min_short_side=72).size == (1600, 1200)
    fast = load_batch([jpeg], PRE, ImageLimits())[0]
    full = preprocess(decode_image(jpeg, 0, ImageLimits()), PRE)
    level = 1 / 255 / min(IMAGENET_STD)
    difference = np.abs(fast - full)
    assert difference.mean() < level and difference.max() < 4 * level


def test_preprocess_normalises_with_the_meta_mean_and_std() -> None:
    pre = Preprocess(input_size=8, resize_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    out = preprocess(Image.new("RGB", (8, 8), (255, 0, 51)), pre)
    np.testing.assert_allclose(out[:, 0, 0], [(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, 0.2 - 0.5], atol=1e-6)


def test_load_batch_stacks_in_order_and_names_the_failing_index() -> None:
    images = [samples.solid_png((255, 0, 0)), samples.solid_png((0, 0, 255))]
    batch = load_batch(images, PRE, ImageLimits())
    assert batch.shape == (2, 3, 32, 32)
    assert batch[0, 0].mean() > batch[1, 0].mean()  # red channel of the red image is higher
    with pytest.raises(ImageError, match="image 2: "):
        load_batch([*images, b"\x89PNG broken"], PRE, ImageLimits())


def test_load_batch_count_limits() -> None:
    image = samples.solid_png((1, 1, 1))
    with pytest.raises(TooLarge, match="3 images in one request exceeds the limit of 2"):
        load_batch([image] * 3, PRE, ImageLimits(max_images=2))
    with pytest.raises(InvalidInput, match="no images"):
        load_batch([], PRE, ImageLimits())


# -- the decode budget (issue 14) ---------------------------------------------------------------

import time  # noqa: E402

from fewshot_common.cancellation import Cancellation  # noqa: E402
from fewshot_common.errors import Cancelled  # noqa: E402
from fewshot_common.jpeg_scans import count_jpeg_scans  # noqa: E402

import hostile_images as hostile  # noqa: E402


def test_scan_count_is_read_from_the_markers() -> None:
    assert count_jpeg_scans(samples.encode(Image.new("RGB", (64, 64)), "JPEG")) == 1
    assert count_jpeg_scans(hostile.progressive_jpeg()) == 10  # libjpeg's progressive script
    assert count_jpeg_scans(hostile.scan_repeating_jpeg(500)) == 510  # 9 + 501 copies
    assert count_jpeg_scans(hostile.scan_repeating_jpeg(500), stop_after=64) == 65


def _noise_jpeg(**save_options: object) -> bytes:
    """Noise: its entropy-coded data holds many stuffed 0xFF00 bytes."""
    noise = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    return samples.encode(Image.fromarray(noise), "JPEG", quality=95, **save_options)


def test_restart_markers_and_stuffed_bytes_inside_a_scan_are_not_markers() -> None:
    baseline, progressive = _noise_jpeg(), _noise_jpeg(progressive=True)
    assert baseline.count(b"\xff\x00") > 50  # the case the marker search must step over
    with_restarts = _noise_jpeg(restart_marker_blocks=1)
    assert sum(with_restarts.count(bytes([0xFF, m])) for m in range(0xD0, 0xD8)) > 100
    assert count_jpeg_scans(baseline) == count_jpeg_scans(with_restarts) == 1
    assert (
        count_jpeg_scans(progressive)
        == count_jpeg_scans(_noise_jpeg(progressive=True, restart_marker_blocks=1))
        == 10
    )


def test_fill_bytes_before_a_marker_are_skipped() -> None:
    """0xFF may pad before any marker (T.81 B.1.1.2), also the one that ends a scan."""
    progressive = _noise_jpeg(progressive=True)
    padded = progressive.replace(b"\xff\xda", b"\xff\xff\xff\xda")  # each scan after fill bytes
    assert padded.count(b"\xff\xff\xff\xda") == 10
    assert count_jpeg_scans(padded) == 10


def test_a_jpeg_repeating_its_last_scan_is_refused_before_decoding() -> None:
    hostile_jpeg = hostile.scan_repeating_jpeg(3000)
    started = time.process_time()
    with pytest.raises(TooLarge, match="image 4: a JPEG with more than 64 scans costs too much"):
        decode_image(hostile_jpeg, 4, ImageLimits())
    assert time.process_time() - started < 0.5
    # A normal progressive JPEG, and one just under the setting, still decode.
    assert decode_image(hostile.progressive_jpeg(), 0, ImageLimits()).size == (256, 256)
    assert decode_image(hostile.scan_repeating_jpeg(54), 0, ImageLimits()).size == (256, 256)  # 64
    with pytest.raises(TooLarge, match="more than 20 scans"):
        decode_image(hostile.scan_repeating_jpeg(11), 0, ImageLimits(max_jpeg_scans=20))


@pytest.mark.parametrize(
    ("mode", "expected"), [("I", round(40000 / 257)), ("I;16", round(40000 / 257)), ("F", 255)]
)
def test_wide_modes_keep_their_scaling(mode: str, expected: int) -> None:
    img = decode_image(hostile.wide_tiff(mode, (50, 30)), 0, ImageLimits())
    assert img.mode == "RGB" and centre_pixel(img) == (expected,) * 3


def test_wide_mode_rounding_matches_division_by_257() -> None:
    values = np.array([[0, 128, 129, 385, 386, 65535, 70000, -5]], dtype=np.int32)
    img = decode_image(samples.encode(Image.fromarray(values, mode="I"), "TIFF"), 0, ImageLimits())
    expected = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)[0]
    assert [img.getpixel((x, 0))[0] for x in range(values.shape[1])] == list(expected)


def test_decoded_memory_is_checked_before_decoding() -> None:
    # 2000 x 2000 in 32-bit mode I is 16 MB decoded, from a file of a few KB.
    data = hostile.wide_tiff("I", (2000, 2000))
    with pytest.raises(TooLarge, match=r"image 1: decoding 2000x2000 in mode I needs 16000000 bytes"):
        decode_image(data, 1, ImageLimits(max_decoded_bytes=10_000_000))
    # The same pixels as 16-bit need half: they fit.
    sixteen = hostile.sixteen_bit_png((2000, 2000))
    assert decode_image(sixteen, 0, ImageLimits(max_decoded_bytes=10_000_000)).size == (2000, 2000)


def test_a_request_over_its_pixel_budget_is_refused_before_any_decode() -> None:
    big = hostile.sixteen_bit_png((1000, 1000))
    with pytest.raises(TooLarge, match="decode to 3000000 pixels in all, over the limit of 2500000"):
        load_batch([big, big, big], PRE, ImageLimits(max_request_pixels=2_500_000))
    assert load_batch([big, big], PRE, ImageLimits(max_request_pixels=2_500_000)).shape[0] == 2
    # JPEGs count the pixels they decode to after DCT scaling (1/8 here), not their header's.
    photo = samples.encode(Image.new("RGB", (1600, 1600), (9, 90, 200)), "JPEG")
    assert load_batch([photo] * 3, PRE, ImageLimits(max_request_pixels=2_500_000)).shape[0] == 3


def test_a_cancelled_request_stops_before_the_next_decode() -> None:
    cancellation = Cancellation()
    cancellation.cancel()
    with pytest.raises(Cancelled, match="before decoding image 0"):
        load_batch([samples.solid_png((1, 2, 3))], PRE, ImageLimits(), cancellation)
    expired = Cancellation.after(-1.0)  # a deadline already passed
    assert expired.is_cancelled() and not Cancellation.after(60).is_cancelled()
