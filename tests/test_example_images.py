"""GET /v1/classes/{label}/examples/{id}/image (issue 35): the stored copy of an example's image,
served back under the class's read rules, over a live server with API keys, and through the client."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin
from test_access import write_key_file

from fewshot_client import FewShotClient, errors
from fewshot_service.app import ServerStack
from fewshot_service.core.example_images import Thumbnails

import image_samples as samples
from conftest import stack_settings

TEAM_A, TEAM_B = "team-a", "team-b"
KEY_SPECS = {"read-a": ("read", [TEAM_A]), "write-a": ("write", [TEAM_A]), "read-b": ("read", [TEAM_B])}


def photo_with_metadata(size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    """A noisy photo carrying GPS EXIF, a comment and an ICC profile: none of it may come back."""
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010E] = "secret description"
    exif.get_ifd(0x8825).update({1: "N", 2: (51.0, 30.0, 12.5), 3: "W", 4: (0.0, 7.0, 39.0)})
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = io.BytesIO()
    if fmt == "JPEG":
        image.save(out, format="JPEG", exif=exif, comment=b"secret comment", icc_profile=icc, quality=90)
    else:
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", "secret comment")
        image.save(out, format="PNG", exif=exif, pnginfo=info, icc_profile=icc)
    return out.getvalue()


SMALL_JPEG = photo_with_metadata((120, 80))  # kept as uploaded, minus its metadata segments
LARGE_JPEG = photo_with_metadata((900, 600))  # scaled down to the stored bound, re-encoded
SMALL_PNG = photo_with_metadata((40, 30), "PNG")  # re-encoded as a PNG of its pixels


@pytest.fixture(scope="module")
def server(tiny_model_path: Path, private_redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    keys = {name: secrets.token_urlsafe(24) for name in KEY_SPECS}
    key_file = tmp_path_factory.mktemp("keys") / "api-keys.toml"
    write_key_file(key_file, {n: (keys[n], *KEY_SPECS[n]) for n in KEY_SPECS})
    settings = stack_settings(
        tiny_model_path, private_redis.url, redis_key_prefix="example-images", api_keys=key_file
    )
    with ServerStack(settings) as stack:
        assert stack.core is not None
        ids = stack.core.add_examples(TEAM_A, "a/b", [SMALL_JPEG, LARGE_JPEG, SMALL_PNG]).example_ids
        stack.core.add_examples(TEAM_B, "other", [SMALL_JPEG])
        # What `fewshot serve --no-store-images` sets: this one example is stored without an image.
        stack.core.store_images = False
        try:
            bare = stack.core.add_examples(TEAM_A, "bare", [samples.solid_png((10, 200, 10))]).example_ids[0]
        finally:
            stack.core.store_images = True
        yield {
            "stack": stack,
            "keys": keys,
            "ids": ids,
            "bare": bare,
            "url": f"http://127.0.0.1:{stack.http_port}",
        }


def http(server: dict, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {server['keys'][key]}"} if key else {}
    return httpx.Client(base_url=server["url"], headers=headers, timeout=60)


def image_url(label: str, example_id: str) -> str:
    from urllib.parse import quote

    return f"/v1/classes/{quote(label, safe='')}/examples/{quote(example_id, safe='')}/image"


def test_the_stored_copy_comes_back_with_its_type_and_caching_headers(server: dict) -> None:
    small, large, png = server["ids"]
    with http(server, "read-a") as client:
        response = client.get(image_url("a/b", small), params={"namespace": TEAM_A})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/jpeg"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "private, no-cache"
        etag = response.headers["etag"]
        assert etag.startswith('"') and etag.endswith('-stored"')
        served = Image.open(io.BytesIO(response.content))
        assert served.size == (120, 80)
        # The served copy's pixels are the upload's: the JPEG's entropy-coded data is kept.
        original = np.asarray(Image.open(io.BytesIO(SMALL_JPEG)).convert("RGB"))
        assert np.array_equal(np.asarray(served.convert("RGB")), original)

        large_copy = client.get(image_url("a/b", large), params={"namespace": TEAM_A})
        assert large_copy.headers["content-type"] == "image/jpeg"
        assert min(Image.open(io.BytesIO(large_copy.content)).size) == 384  # the stored bound

        png_copy = client.get(image_url("a/b", png), params={"namespace": TEAM_A})
        assert png_copy.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png_copy.content)).format == "PNG"


@pytest.mark.parametrize("which", [0, 1, 2], ids=["small-jpeg", "large-jpeg", "png"])
def test_served_copies_carry_no_metadata(server: dict, which: int) -> None:
    with http(server, "read-a") as client:
        body = client.get(image_url("a/b", server["ids"][which]), params={"namespace": TEAM_A}).content
    assert b"secret" not in body and b"Exif" not in body and b"ICC_PROFILE" not in body
    image = Image.open(io.BytesIO(body))
    assert not image.getexif()
    assert not {"icc_profile", "comment", "Comment", "exif", "xmp"} & set(image.info)


def test_thumbnails_are_bounded_never_enlarged_and_revalidate(server: dict) -> None:
    small, large, _ = server["ids"]
    with http(server, "read-a") as client:
        params = {"namespace": TEAM_A, "size": 64}
        thumb = client.get(image_url("a/b", large), params=params)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) == 64
        assert thumb.headers["etag"].endswith('-64"')
        same = client.get(
            image_url("a/b", large), params=params, headers={"If-None-Match": thumb.headers["etag"]}
        )
        assert (
            same.status_code == 304 and same.content == b"" and same.headers["etag"] == thumb.headers["etag"]
        )
        other_size = client.get(
            image_url("a/b", large),
            params={**params, "size": 65},
            headers={"If-None-Match": thumb.headers["etag"]},
        )
        assert other_size.status_code == 200

        stored = client.get(image_url("a/b", small), params={"namespace": TEAM_A}).content
        asked_larger = client.get(image_url("a/b", small), params={"namespace": TEAM_A, "size": 512})
        assert asked_larger.content == stored  # 120x80 stays 120x80

        for size in (15, 513, -1):
            refused = client.get(image_url("a/b", small), params={"namespace": TEAM_A, "size": size})
            assert refused.status_code == 422 and refused.json()["error"] == "invalid_input", size


def test_read_rules_are_the_classs(server: dict) -> None:
    small = server["ids"][0]
    url, params = image_url("a/b", small), {"namespace": TEAM_A}
    with http(server, None) as client:
        refused = client.get(url, params=params)
        assert refused.status_code == 401 and refused.json()["error"] == "unauthenticated"
    with http(server, "read-b") as client:
        refused = client.get(url, params=params)
        assert refused.status_code == 403 and refused.json()["error"] == "permission_denied"
        assert client.get(image_url("other", "1"), params={"namespace": TEAM_B}).status_code == 200
    with http(server, "write-a") as client:
        assert client.get(url, params=params).status_code == 200


def test_missing_images_are_404_with_a_reason(server: dict) -> None:
    with http(server, "read-a") as client:
        bare = client.get(image_url("bare", server["bare"]), params={"namespace": TEAM_A})
        assert bare.status_code == 404
        assert bare.json()["error"] == "not_found" and "--no-store-images" in bare.json()["message"]
        assert (
            client.get(image_url("a/b", "999"), params={"namespace": TEAM_A}).json()["error"] == "not_found"
        )
        gone = client.get(image_url("nope", "1"), params={"namespace": TEAM_A})
        assert gone.status_code == 404 and "no class" in gone.json()["message"]
        # The class itself still answers: the route did not swallow GET /v1/classes/{label}.
        assert client.get("/v1/classes/a%2Fb", params={"namespace": TEAM_A}).json()["count"] == 3


def test_the_client_reads_images(server: dict) -> None:
    small, large, _ = server["ids"]
    with FewShotClient(http_url=server["url"], api_key=server["keys"]["read-a"]) as client:
        data = client.example_image("a/b", small, namespace=TEAM_A)
        assert Image.open(io.BytesIO(data)).size == (120, 80)
        thumb = client.example_image("a/b", large, size=32, namespace=TEAM_A)
        assert max(Image.open(io.BytesIO(thumb)).size) == 32
        with pytest.raises(errors.NotFound, match="no-store-images"):
            client.example_image("bare", server["bare"], namespace=TEAM_A)
        with pytest.raises(errors.InvalidInput):
            client.example_image("a/b", small, size=4, namespace=TEAM_A)
    with FewShotClient(http_url=server["url"], api_key=server["keys"]["read-b"]) as client:
        with pytest.raises(errors.PermissionDenied):
            client.example_image("a/b", small, namespace=TEAM_A)


def test_thumbnail_cache_stays_within_its_bytes() -> None:
    from fewshot_service.core.example_images import StoredImage

    cache = Thumbnails(cache_bytes=3000)
    images = [StoredImage.of(photo_with_metadata((200 + i, 150))) for i in range(6)]
    for image in images:
        made = cache.of(image, 48)
        assert max(Image.open(io.BytesIO(made)).size) == 48
        assert cache.of(image, 48) is made  # the second ask is the cached bytes
    assert cache._held <= 3000 and len(cache._cache) < len(images)


def test_get_class_names_the_example_each_near_duplicate_repeats(server: dict) -> None:
    stack = server["stack"]
    first, other, again = (samples.noise_png(1), samples.noise_png(2), samples.noise_png(1))
    ids = stack.core.add_examples(TEAM_A, "dups", [first, other, again]).added_example_ids
    with http(server, "read-a") as client:
        examples = client.get("/v1/classes/dups", params={"namespace": TEAM_A}).json()["examples"]
    assert [e["near_duplicate_of"] for e in examples] == [None, None, ids[0]]


def test_near_duplicates_are_found_across_row_blocks() -> None:
    from fewshot_service.classify.shot_quality import near_duplicates

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(600, 32)).astype(np.float32)
    vectors[550] = vectors[3]  # past the first block of rows
    vectors[300] = vectors[299] * 0.999 + vectors[7] * 0.001
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    twins = near_duplicates(vectors, 0.98)
    assert {i: t for i, t in enumerate(twins) if t is not None} == {300: 299, 550: 3}
