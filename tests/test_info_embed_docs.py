"""GET /v1/info (model, preprocessing, licence), POST /v1/embed, and /docs + /redoc served with no
internet: every asset they reference is on this server."""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_client import FewShotClient
from fewshot_common.embedder import Embedder
from fewshot_common.model_license import model_license
from fewshot_common.modelmeta import Preprocess
from fewshot_common.openvino_engine import bf16_is_fastest
from fewshot_service.app import ServerStack

from conftest import REPO_ROOT, stack_settings


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def stack(private_redis, tiny_model_path: Path) -> Iterator[ServerStack]:
    with ServerStack(stack_settings(tiny_model_path, private_redis.url)) as running:
        yield running


@pytest.fixture
def http(stack: ServerStack, redis_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=30) as client:
        yield client


def test_info_describes_the_served_model(http: httpx.Client, stack: ServerStack) -> None:
    info = http.get("/v1/info").json()
    meta = stack.core.embedder.meta
    assert info["model_id"] == meta.model_id == stack.core.model_id
    assert info["embedding_dim"] == meta.embedding_dim
    assert info["preprocess"]["input_size"] == 32 and info["preprocess"]["resize_size"] == 36
    assert info["precision"] == "fp32"
    assert info["engine"] == "onnxruntime CPUExecutionProvider"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"])
    assert info["license"] is None  # the test model states none, and has no sidecar


def test_info_of_the_default_model_states_its_non_commercial_licence(private_redis) -> None:
    settings = stack_settings(REPO_ROOT / "models" / "default.onnx", private_redis.url)
    with ServerStack(settings) as running:
        info = httpx.get(f"http://127.0.0.1:{running.http_port}/v1/info").json()
    assert info["model_id"] == "vit_tiny_d6_p8_64-cfc47f764064"
    # A CPU serves default.int8.onnx, or default.bf16.onnx through OpenVINO where it has AMX-BF16:
    # the licence comes from their fp32 parent's sidecar.
    if bf16_is_fastest():
        assert (info["precision"], info["engine"]) == ("bf16", "openvino CPU (bf16)")
    else:
        assert (info["precision"], info["engine"]) == ("int8", "onnxruntime CPUExecutionProvider")
    assert "Tiny ImageNet" in info["license"] and "non-commercial" in info["license"]


def test_licence_from_the_model_metadata_wins_over_a_sidecar(tmp_path: Path) -> None:
    from fewshot_trainer.export import export_onnx
    from fewshot_trainer.vit import build_vit, get_arch

    torch.manual_seed(0)
    spec = get_arch("vit_test_p8_32")
    path = tmp_path / "licensed.onnx"
    export_onnx(
        build_vit(spec),
        spec,
        Preprocess(input_size=32, resize_size=36),
        path,
        extra={"license": "CC-BY-4.0, trained on my own photos"},
    )
    (tmp_path / "licensed.onnx.license").write_text("the sidecar's text")
    assert model_license(path, Embedder(path).meta) == "CC-BY-4.0, trained on my own photos"


def test_licence_from_a_sidecar_next_to_the_model(tmp_path: Path, tiny_model_path: Path) -> None:
    model = tmp_path / "mine.onnx"
    shutil.copy(tiny_model_path, model)
    meta = Embedder(model).meta
    assert model_license(model, meta) is None
    (tmp_path / "mine.onnx.license").write_text("  Research use only.\n")
    assert model_license(model, meta) == "Research use only."


def test_embed_over_rest_gives_the_grpc_embeddings(http: httpx.Client, stack: ServerStack) -> None:
    images = [png((230, 20, 20)), png((20, 20, 230))]
    response = http.post(
        "/v1/embed", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == stack.core.model_id
    vectors = np.array(body["embeddings"], dtype=np.float32)
    assert vectors.shape == (2, body["dim"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    with FewShotClient(f"127.0.0.1:{stack.grpc_port}") as client:
        np.testing.assert_allclose(vectors, client.embed(images), atol=1e-5)


def test_embed_refuses_a_non_image_by_its_file_name(http: httpx.Client) -> None:
    response = http.post("/v1/embed", files=[("files", ("notes.txt", b"hello", "text/plain"))])
    assert response.status_code == 415  # not one of the accepted formats, told from its bytes
    body = response.json()
    assert body["error"] == "unsupported_format" and body["file"] == "notes.txt"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_every_asset_from_this_server(http: httpx.Client, page: str) -> None:
    html = http.get(page).text
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""(?:url|spec-url)\s*:\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""spec-url=["']([^"']+)["']""", html)
    assert len(urls) >= 2, html
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        response = http.get(url)
        assert response.status_code == 200, url
        if url.endswith(".js"):  # nor does a script draw an image from elsewhere (ReDoc's logo did)
            assert not re.search(r'src\s*:\s*"https?://', response.text), url
    assert not re.search(r"https?://", re.sub(r"<!--.*?-->", "", html, flags=re.S)), html


def test_the_favicon_is_served(http: httpx.Client) -> None:
    for url in ("/favicon.ico", "/ui/favicon.ico"):
        response = http.get(url)
        assert response.status_code == 200, url
        assert Image.open(io.BytesIO(response.content)).format == "ICO"
    assert '<link rel="icon" href="favicon.ico">' in http.get("/ui/").text
