"""A `fewshot serve` process logs one line per HTTP request and per gRPC call, and exports request
metrics labelled by route template / gRPC method and status, as a Prometheus user expects."""

from __future__ import annotations

import io
import re
from pathlib import Path

import grpc
import httpx
from PIL import Image

from fewshot_client import FewShotClient


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{wanted}}} in /metrics")


def test_access_log_lines_and_request_metrics(serve_process, tiny_model_path: Path, tmp_path: Path) -> None:
    server = serve_process(["--model", tiny_model_path, "--data-dir", tmp_path / "data"]).wait_ready()
    image = png()
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        added = http.post(
            "/v1/classes/a%2Fb/examples",
            files=[("files", ("secret-name.png", image, "image/png"))],
            headers={"X-Request-ID": "req-42"},
        )
        assert added.status_code == 201 and added.headers["X-Request-ID"] == "req-42"
        generated = http.get("/v1/classes/no-such-class").headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{16}", generated)
        # A hostile request id is not echoed (nor logged): a new one replaces it.
        assert http.get("/healthz", headers={"X-Request-ID": "x\ty"}).headers["X-Request-ID"] != "x\ty"
        for raw in ("/nope/1", "/nope/2"):
            assert http.get(raw).status_code == 404
        with FewShotClient(server.grpc_target) as client:
            assert client.classify([image])[0][0].label == "a/b"
            try:
                client.classify([b"not an image"])
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            else:
                raise AssertionError("a broken image was classified")
        metrics = http.get("/metrics").text
    log = server.output()

    classes = "/v1/classes/{label:path}"
    assert re.search(
        rf"http method=POST route={re.escape(classes)}/examples status=201 ms=[\d.]+ key=- request_id=req-42",
        log,
    ), log
    assert f"http method=GET route={classes} status=404" in log
    assert "http method=GET route=unmatched status=404" in log
    assert re.search(r"grpc method=/fewshot.v1.FewShot/Classify code=OK ms=[\d.]+", log), log
    assert "grpc method=/fewshot.v1.FewShot/Classify code=INVALID_ARGUMENT" in log
    # No image byte, no file name, no raw path of an unmatched request, no uvicorn access line.
    assert "secret-name" not in log and "/nope/" not in log and '"GET /' not in log

    assert (
        metric(
            metrics, "fewshot_http_requests_total", method="POST", route=f"{classes}/examples", status="201"
        )
        == 1
    )
    assert metric(metrics, "fewshot_http_requests_total", method="GET", route="unmatched", status="404") == 2
    assert (
        metric(metrics, "fewshot_http_request_seconds_count", method="POST", route=f"{classes}/examples") == 1
    )
    method = "/fewshot.v1.FewShot/Classify"
    assert metric(metrics, "fewshot_grpc_requests_total", method=method, code="OK") == 1
    assert metric(metrics, "fewshot_grpc_requests_total", method=method, code="INVALID_ARGUMENT") == 1
    assert metric(metrics, "fewshot_grpc_request_seconds_count", method=method) == 2
    assert "/nope" not in metrics  # the raw path never becomes a label
