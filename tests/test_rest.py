"""The REST API over a real server stack: uvicorn on a loopback port, the real exported model,
a private Redis. Every error has its status and a JSON body; nothing answers 500."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from fewshot_service.app import ServerStack
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.registry.registry import Registry
from fewshot_service.settings import Settings

MAX_IMAGES = 4
MAX_IMAGE_BYTES = 100_000
MAX_REQUEST_BYTES = 300_000
MAX_PIXELS = 250_000


def png(colour: tuple[int, int, int], size: int = 40) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


RED, GREEN = png((230, 20, 20)), png((20, 230, 20))


def files(*images: bytes, names: list[str] | None = None) -> list[tuple[str, tuple[str, bytes, str]]]:
    names = names or [f"img{i}.png" for i in range(len(images))]
    return [("files", (name, data, "image/png")) for name, data in zip(names, images, strict=True)]


def path(label: str, suffix: str = "") -> str:
    """A class URL with every reserved character of the label percent-encoded (``/`` too)."""
    return f"/v1/classes/{quote(label, safe='')}{suffix}"


@pytest.fixture(scope="module")
def stack(private_redis: ManagedRedis, tiny_model_path: Path) -> Iterator[ServerStack]:
    settings = Settings(
        model=tiny_model_path,
        redis_url=private_redis.url,
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        max_images=MAX_IMAGES,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_request_bytes=MAX_REQUEST_BYTES,
        max_pixels=MAX_PIXELS,
    )
    with ServerStack(settings) as running:
        yield running


@pytest.fixture
def http(stack: ServerStack, redis_url: str) -> Iterator[httpx.Client]:
    # redis_url empties the private server before each test.
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=30) as client:
        yield client


def assert_error(response: httpx.Response, status: int, error: str, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == error, body
    for fragment in fragments:
        assert fragment in body["message"], body
    return body


def test_class_lifecycle(http: httpx.Client, stack: ServerStack) -> None:
    added = http.post(path("red", "/examples"), files=files(RED, RED, RED))
    assert added.status_code == 201, added.text
    body = added.json()
    assert (body["label"], body["count"], body["namespace"]) == ("red", 3, "default")
    assert body["model_id"] == stack.core.model_id and len(body["added_example_ids"]) == 3
    more = http.post(path("red", "/examples"), files=files(RED, RED)).json()
    assert more["count"] == 5 and len(set(more["example_ids"])) == 5
    http.post(path("green", "/examples"), files=files(GREEN))

    listed = http.get("/v1/classes").json()
    assert listed == {
        "namespace": "default",
        "classes": [{"label": "green", "count": 1}, {"label": "red", "count": 5}],
        "next_cursor": None,  # one page holds them all
    }
    one = http.get(path("red")).json()
    assert one["count"] == 5 and one["example_ids"] == more["example_ids"]

    removed = http.delete(path("red", f"/examples/{more['added_example_ids'][0]}"))
    assert removed.status_code == 200 and removed.json()["count"] == 4
    assert removed.json()["class_deleted"] is False
    last = http.delete(path("green", f"/examples/{http.get(path('green')).json()['example_ids'][0]}"))
    assert last.json()["class_deleted"] is True
    assert http.delete(path("red")).json() == {"namespace": "default", "label": "red", "deleted": True}
    assert http.get("/v1/classes").json()["classes"] == []


def test_classify_over_rest_ranks_the_matching_class_first(http: httpx.Client) -> None:
    http.post(path("red", "/examples"), files=files(RED))
    http.post(path("green", "/examples"), files=files(GREEN))
    result = http.post("/v1/classify", files=files(GREEN, RED), params={"top_k": 2}).json()
    assert [r[0]["label"] for r in result["results"]] == ["green", "red"]
    assert result["results"][0][0]["score"] == pytest.approx(1.0, abs=1e-4)  # cosine with itself


def test_namespaces_keep_classes_apart(http: httpx.Client) -> None:
    http.post(path("red", "/examples"), params={"namespace": "shop/a b"}, files=files(RED))
    assert http.get("/v1/classes").json()["classes"] == []
    listed = http.get("/v1/classes", params={"namespace": "shop/a b"}).json()
    assert listed["namespace"] == "shop/a b" and listed["classes"][0]["label"] == "red"
    assert_error(http.get(path("red")), 404, "not_found", "'red'")


LABELS = ["a/b", "/leading", "trailing/", "*", "k:v", "{tag}", "}{", "two words", "🐱 cat", "50%", "q?#&="]


def test_any_label_round_trips_verbatim(http: httpx.Client) -> None:
    for label in LABELS:
        response = http.post(path(label, "/examples"), files=files(RED))
        assert response.status_code == 201 and response.json()["label"] == label, response.text
    assert [c["label"] for c in http.get("/v1/classes").json()["classes"]] == sorted(LABELS)
    for label in LABELS:
        assert http.get(path(label)).json()["label"] == label
    for label in LABELS:
        assert http.delete(path(label)).status_code == 200
    assert http.get("/v1/classes").json()["classes"] == []


def test_unencoded_slashes_work_and_encoded_ones_never_clash_with_the_examples_suffix(
    http: httpx.Client,
) -> None:
    # A raw '/' in the path is part of the label...
    assert http.post("/v1/classes/animals/cat/examples", files=files(RED)).json()["label"] == "animals/cat"
    assert http.get("/v1/classes/animals/cat").json()["count"] == 1
    # ...and a label that itself ends in "/examples/<id>" is reachable once its '/' are encoded.
    tricky = "x/examples/1"
    added = http.post(path(tricky, "/examples"), files=files(RED, RED)).json()
    assert added["label"] == tricky
    assert http.delete(path(tricky)).json()["label"] == tricky  # the class, not example 1 of "x"
    assert_error(http.get(path(tricky)), 404, "not_found")
    assert http.delete("/v1/classes/animals/cat").status_code == 200


def test_a_multi_file_add_with_one_bad_file_adds_nothing_and_names_it(http: httpx.Client) -> None:
    response = http.post(
        path("red", "/examples"),
        files=files(RED, b"this is not an image", RED, names=["ok.png", "broken.jpg", "ok2.png"]),
    )
    # Bytes of no known format: 415 since issue 29 (the allowlist is checked from the magic numbers).
    body = assert_error(response, 415, "unsupported_format", "broken.jpg", "not a decodable image")
    assert (body["file"], body["index"]) == ("broken.jpg", 1)
    assert_error(http.get(path("red")), 404, "not_found")
    truncated = RED[: len(RED) // 2]
    body = assert_error(http.post(path("red", "/examples"), files=files(truncated)), 422, "invalid_input")
    assert body["file"] == "img0.png"
    assert_error(http.post(path("red", "/examples"), files=files(b"")), 422, "invalid_input", "empty")
    assert http.get("/v1/classes").json()["classes"] == []


def test_limits_are_413(http: httpx.Client) -> None:
    too_many = files(*[RED] * (MAX_IMAGES + 1))
    assert_error(http.post(path("red", "/examples"), files=too_many), 413, "too_large", str(MAX_IMAGES))
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, format="PNG")
    assert len(big.getvalue()) > MAX_IMAGE_BYTES
    assert_error(http.post(path("red", "/examples"), files=files(big.getvalue())), 413, "too_large")
    wide = io.BytesIO()
    Image.new("L", (1000, 1000)).save(wide, format="PNG")  # a few KiB, but a million pixels
    assert_error(
        http.post(path("red", "/examples"), files=files(wide.getvalue())), 413, "too_large", "pixels"
    )
    huge = b"\0" * (MAX_REQUEST_BYTES + 1)
    assert_error(http.post(path("red", "/examples"), files=files(huge)), 413, "too_large", "limit")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield (
            b'--zzz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        for _ in range(MAX_REQUEST_BYTES // 10_000 + 2):
            yield b"x" * 10_000

    response = http.post(
        path("red", "/examples"),
        content=chunked(),
        headers={"content-type": "multipart/form-data; boundary=zzz"},
    )
    assert_error(response, 413, "too_large", "limit")
    assert http.get("/v1/classes").json()["classes"] == []


def test_not_found_and_failed_precondition(http: httpx.Client, redis_url: str, stack: ServerStack) -> None:
    assert_error(http.get(path("nope")), 404, "not_found", "'nope'")
    assert_error(http.delete(path("nope")), 404, "not_found")
    http.post(path("red", "/examples"), files=files(RED))
    assert_error(http.delete(path("red", "/examples/999")), 404, "not_found", "999")
    assert_error(
        http.post("/v1/classify", files=files(RED), params={"namespace": "empty"}),
        409,
        "failed_precondition",
        "no classes",
    )

    # A namespace filled by another model without stored images: this server may add to it, but
    # cannot classify until the other model's example is re-uploaded; the 409 says how far it is.
    Registry(redis.Redis.from_url(redis_url)).add_examples(
        "old", "cat", np.ones((1, 8), np.float32), "some-older-model"
    )
    assert (
        http.post(path("dog", "/examples"), params={"namespace": "old"}, files=files(RED)).status_code == 201
    )
    body = assert_error(
        http.post("/v1/classify", params={"namespace": "old"}, files=files(RED)),
        409,
        "failed_precondition",
        "1 of 2 examples embedded",
        stack.core.model_id,
        "1 examples have no stored image",
        "'some-older-model' (1 of 2)",
    )
    assert body["progress"] == {
        "model_id": stack.core.model_id,
        "embedded": 1,
        "total": 2,
        "without_image": 1,
        "backfilling": False,
    }


def test_bad_names_are_422(http: httpx.Client) -> None:
    assert_error(http.post(path("x" * 129, "/examples"), files=files(RED)), 422, "invalid_input", "128")
    assert_error(http.get("/v1/classes", params={"namespace": "n" * 129}), 422, "invalid_input", "128")
    assert_error(http.post(path("red", "/examples")), 422, "invalid_request", "files")
    assert_error(http.get("/v1/classes/"), 422, "invalid_input", "label")


def test_names_that_are_not_utf8_once_percent_decoded_are_422_and_add_nothing(http: httpx.Client) -> None:
    # Both used to become the one class "bad\ufffd"; now each is refused, naming what is wrong.
    for raw in ("bad%FF", "bad%FE", "caf%C3"):
        assert_error(
            http.post(f"/v1/classes/{raw}/examples", files=files(RED)),
            422,
            "invalid_input",
            "label is not valid UTF-8",
        )
        assert_error(
            http.post(f"/v1/classes/red/examples?namespace={raw}", files=files(RED)),
            422,
            "invalid_input",
            "query parameter 'namespace' is not valid UTF-8",
        )
        assert_error(http.get(f"/v1/classes?namespace={raw}"), 422, "invalid_input", "namespace")
        assert_error(http.post(f"/v1/classify?namespace={raw}", files=files(RED)), 422, "invalid_input")
    assert_error(http.delete("/v1/classes/red/examples/1%FF"), 422, "invalid_input", "example id")
    assert http.get("/v1/classes").json()["classes"] == []
    # Percent-encoded UTF-8 is still decoded, in the path and in the query.
    assert http.post("/v1/classes/caf%C3%A9/examples?namespace=%C3%BC", files=files(RED)).status_code == 201
    listing = http.get("/v1/classes", params={"namespace": "\u00fc"}).json()
    assert [c["label"] for c in listing["classes"]] == ["caf\u00e9"]


JUNK = [
    (
        "POST",
        "/v1/classes/red/examples",
        {"content": b"\x00\xff" * 50, "headers": {"content-type": "multipart/form-data"}},
    ),
    (
        "POST",
        "/v1/classes/red/examples",
        {"content": b"--x\r\n\r\n", "headers": {"content-type": "multipart/form-data; boundary=x"}},
    ),
    ("POST", "/v1/classes/red/examples", {"json": {"files": "abc"}}),
    ("POST", "/v1/classes/red/examples", {"data": {"files": "not a file"}}),
    ("POST", "/v1/classes/red/examples", {"content": b"junk", "headers": {"content-type": "text/plain"}}),
    ("POST", "/v1/classify", {"files": [("files", ("a.png", RED, "image/png"))], "params": {"top_k": "-3"}}),
    (
        "POST",
        "/v1/classify",
        {"files": [("files", ("a.png", RED, "image/png"))], "params": {"top_k": "many"}},
    ),
    ("POST", "/v1/classify", {"files": [("files", ("a.gif", b"GIF89a\x01\x00", "image/gif"))]}),
    ("GET", "/v1/classes/%FF%FE", {}),
    ("GET", "/v1/classes/%00", {}),
    ("DELETE", "/v1/classes/red/examples/%FF", {}),
    ("PUT", "/v1/classes/red", {}),
    ("GET", "/v1/nothing-here", {}),
    ("GET", "/v1/classes", {"params": {"namespace": ""}}),
]


@pytest.mark.parametrize("method,url,kwargs", JUNK, ids=[f"{m} {u}" for m, u, _ in JUNK])
def test_junk_input_never_gets_a_500(http: httpx.Client, method: str, url: str, kwargs: dict) -> None:
    response = http.request(method, url, **kwargs)
    assert 200 <= response.status_code < 500, (response.status_code, response.text)
    assert isinstance(response.json(), dict)
    if response.status_code >= 400:
        assert response.json()["message"]


def test_health_readiness_metrics_and_docs(http: httpx.Client, stack: ServerStack) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "model_loaded": True,
        "model_id": stack.core.model_id,
        "redis": True,
    }
    http.post(path("red", "/examples"), files=files(RED))
    metrics = http.get("/metrics").text
    assert 'fewshot_http_responses_total{method="POST",status="201"}' in metrics
    assert "fewshot_images_total" in metrics
    # Which model, precision and engine this replica serves (the test model: fp32 on ONNX Runtime).
    assert (
        f'fewshot_model_info{{engine="onnxruntime CPUExecutionProvider",model_id="{stack.core.model_id}",'
        'precision="fp32"} 1.0'
    ) in metrics
    assert http.get("/docs").status_code == 200
    openapi = http.get("/openapi.json").json()
    assert "/v1/classes/{label}/examples" in openapi["paths"]


def test_grey_palette_alpha_cmyk_16_bit_and_animated_images_are_valid_examples(http: httpx.Client) -> None:
    def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
        out = io.BytesIO()
        image.save(out, format=fmt, **options)
        return out.getvalue()

    base = Image.new("RGB", (48, 32), (200, 40, 40))
    frames = [Image.new("P", (32, 32), i) for i in (10, 200)]
    images = {
        "grey.png": encode(base.convert("L"), "PNG"),
        "palette.gif": encode(base.convert("P"), "GIF"),
        "alpha.png": encode(base.convert("RGBA"), "PNG"),
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "deep.png": encode(Image.new("I;16", (32, 32), 40_000), "PNG"),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
    }
    uploads = files(*images.values(), names=list(images))
    response = http.post(path("modes", "/examples"), files=uploads[:MAX_IMAGES])
    assert response.status_code == 201, response.text
    response = http.post(path("modes", "/examples"), files=uploads[MAX_IMAGES:])
    assert response.status_code == 201 and response.json()["count"] == len(images), response.text


def test_classes_are_listed_a_page_at_a_time_with_a_cursor_and_a_search(
    stack: ServerStack, http: httpx.Client
) -> None:
    rng = np.random.default_rng(31)
    assert stack.core is not None
    dim = stack.core.embedder.meta.embedding_dim
    labels = [f"item {i:03d}" for i in range(250)] + ["Zebra/striped"]
    stack.core.registry.add_classes(
        "paged",
        {label: rng.standard_normal((1 + i % 2, dim)) for i, label in enumerate(labels)},
        stack.core.model_id,
    )
    seen, cursor, pages = [], None, 0
    while True:
        params = {"namespace": "paged", "limit": 100, **({"cursor": cursor} if cursor else {})}
        body = http.get("/v1/classes", params=params).json()
        assert len(body["classes"]) <= 100
        seen += [c["label"] for c in body["classes"]]
        pages, cursor = pages + 1, body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == sorted(labels)  # by label, nothing repeated or skipped
    # A class added between pages lands in its place; the cursor does not shift.
    first = http.get("/v1/classes", params={"namespace": "paged", "limit": 2}).json()
    assert [c["label"] for c in first["classes"]] == ["Zebra/striped", "item 000"]
    stack.core.registry.add_classes("paged", {"A first": rng.standard_normal((1, dim))}, stack.core.model_id)
    second = http.get(
        "/v1/classes", params={"namespace": "paged", "limit": 2, "cursor": first["next_cursor"]}
    ).json()
    assert [c["label"] for c in second["classes"]] == ["item 001", "item 002"]

    found = http.get("/v1/classes", params={"namespace": "paged", "q": "zebra"}).json()
    assert found["classes"] == [{"label": "Zebra/striped", "count": 1}] and found["next_cursor"] is None
    searched = http.get("/v1/classes", params={"namespace": "paged", "q": "item 1", "limit": 60}).json()
    assert [c["label"] for c in searched["classes"]] == [f"item {i}" for i in range(100, 160)]
    assert searched["next_cursor"] is not None
    default = http.get("/v1/classes", params={"namespace": "paged"}).json()
    assert len(default["classes"]) == 252 and default["next_cursor"] is None  # the default page holds 1,000


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"limit": 1001}, "limit must be between 0 and 1000"),
        ({"limit": -1}, "limit"),
        ({"q": "x" * 129}, "q must be"),
    ],
)
def test_a_bad_page_request_is_refused(http: httpx.Client, params: dict, fragment: str) -> None:
    http.post(path("red", "/examples"), files=files(png((200, 0, 0))))
    assert_error(http.get("/v1/classes", params=params), 422, "invalid_input", fragment)


@pytest.mark.parametrize("cursor, labels", [("%%%", ["blue", "red"]), ("zz", []), ("m", ["red"])])
def test_a_cursor_the_server_did_not_hand_out_is_a_position_of_its_own(
    http: httpx.Client, cursor: str, labels: list[str]
) -> None:
    """Any string is a cursor (the schema says so): one not handed out starts the page after its
    own text in label order ("zz" decodes to bytes that are not UTF-8 and names itself)."""
    for label, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        http.post(path(label, "/examples"), files=files(png(colour)))
    answer = http.get("/v1/classes", params={"cursor": cursor})
    assert answer.status_code == 200, answer.text
    assert [c["label"] for c in answer.json()["classes"]] == labels
