"""Issue 29: decodes run in worker processes under hard limits; formats are an allowlist; the
scan counter skips stray bytes; stored copies carry no metadata. Real worker processes, a real
server stack (REST, gRPC, model, private Redis)."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc
from fewshot_common.errors import TooLarge, Unavailable
from fewshot_common.images import ImageLimits, open_image
from fewshot_common.jpeg_scans import count_jpeg_scans
from fewshot_common.modelmeta import Preprocess
from fewshot_service.app import ServerStack
from fewshot_service.core.decode_isolation import DecodeWorker
from fewshot_service.core.decode_pool import DecodePool
from fewshot_service.core.stored_images import bounded_copy

import broken_decode_worker as broken_worker
import hostile_images as hostile
import image_samples as samples
from conftest import stack_settings

MiB = 1 << 20
PRE = Preprocess(input_size=32, resize_size=36)
# Small budgets, so the bombs are refused quickly and the test machine stays comfortable.
MEMORY = 160 * MiB
CPU_S = 1


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the scan counter -----------------------------------------------------------------------------


def test_a_stray_byte_after_app0_does_not_hide_the_scans() -> None:
    data = hostile.stray_byte_jpeg(3000)
    assert count_jpeg_scans(data, stop_after=64) == 65
    with pytest.raises(TooLarge, match="more than 64 scans"):
        open_image(data, 0, ImageLimits())
    # libjpeg itself skips the byte and decodes the image: the file is a real one.
    assert Image.open(io.BytesIO(hostile.stray_byte_jpeg(2))).convert("RGB").size == (256, 256)


# -- the worker processes -----------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    pool = DecodePool(workers=1, max_queued=1)
    yield pool
    pool.close()


def test_the_worker_imports_no_onnxruntime() -> None:
    code = (
        "import sys, fewshot_service.core.decode_worker; print(sorted(m for m in sys.modules if 'onnx' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_worker_killed_mid_job_is_replaced_and_the_next_job_succeeds(pool: DecodePool) -> None:
    limits = ImageLimits(max_decode_cpu_s=30)
    assert pool.load_batch([samples.solid_png((1, 2, 3))], PRE, limits).shape == (1, 3, 32, 32)
    worker = pool.processes[0]
    first_pid = worker.pid
    slow = hostile.scan_repeating_jpeg(54, (6000, 6000))  # about 1.5 s of decoding
    quick = samples.solid_png((9, 9, 9))
    errors: list[Exception] = []
    job = threading.Thread(target=lambda: _catch(errors, pool.load_batch, [quick, quick, slow], PRE, limits))
    job.start()
    time.sleep(0.5)
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)
    job.join(10)
    assert len(errors) == 1 and isinstance(errors[0], TooLarge), errors
    assert "image 2" in str(errors[0])  # the one it died on, told through the shared page
    assert pool.load_batch([samples.solid_png((4, 5, 6))], PRE, limits).shape == (1, 3, 32, 32)
    assert worker.pid not in (None, first_pid) and worker.started == 2


@pytest.mark.parametrize("reply", sorted(broken_worker.REPLIES))
def test_a_worker_that_answers_out_of_protocol_is_replaced_and_the_request_may_retry(
    reply: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither the image's fault (no 4xx naming it) nor a bug to show as a 500: a 503 to retry,
    the reason in the server log, and a fresh process for the next job."""
    tests_dir = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FEWSHOT_BROKEN_REPLY", reply)
    worker = DecodeWorker(module="broken_decode_worker")
    try:
        for job in (1, 2):  # the second job goes to the replacement, broken in the same way
            with caplog.at_level(logging.ERROR, logger="fewshot_service.core.decode_isolation"):
                with pytest.raises(Unavailable, match="out of protocol; retry"):
                    worker.load_batch_and_copies([samples.solid_png((1, 2, 3))], PRE, ImageLimits())
            assert worker.started == job + 1 and worker.pid is not None
        assert "decode worker answered" in caplog.text
    finally:
        worker.stop()


def _wait_for_image(worker: DecodeWorker, index: int, seconds: float = 10) -> None:
    give_up = time.monotonic() + seconds
    while worker.current_image != index:
        assert time.monotonic() < give_up, f"the worker never reached image {index}"
        time.sleep(0.005)


@pytest.mark.slow
def test_a_worker_that_stops_mid_job_is_stopped_at_the_wall_clock_deadline_naming_its_image(
    pool: DecodePool,
) -> None:
    """The backstop for a decoder the CPU limit cannot see (here: SIGSTOP, which pauses its CPU
    clock too): 5 s of wall clock per CPU second of an image's budget, from that image's start."""
    limits = ImageLimits(max_decode_cpu_s=1)
    assert pool.load_batch([samples.solid_png((1, 2, 3))], PRE, limits).shape == (1, 3, 32, 32)
    worker = pool.processes[0]
    stopped_pid = worker.pid
    assert stopped_pid is not None
    slow = hostile.scan_repeating_jpeg(54, (3000, 3000))  # about 0.4 s of CPU
    quick = samples.solid_png((9, 9, 9))
    errors: list[Exception] = []
    job = threading.Thread(target=lambda: _catch(errors, pool.load_batch, [quick, slow, quick], PRE, limits))
    job.start()
    _wait_for_image(worker, 1)
    os.kill(stopped_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    job.join(15)
    waited = time.monotonic() - stopped_at
    assert len(errors) == 1 and isinstance(errors[0], TooLarge), errors
    assert "image 1: decoding took longer than 5 s" in str(errors[0])
    assert 4 < waited < 8, waited
    assert not Path(f"/proc/{stopped_pid}").exists() or worker.pid != stopped_pid
    assert pool.load_batch([quick], PRE, limits).shape == (1, 3, 32, 32)  # a fresh worker


def test_the_wall_clock_deadline_restarts_with_every_image(pool: DecodePool) -> None:
    """A job of many images may take far longer than one image's deadline, as long as each
    image keeps within its own."""
    unbounded_scans = ImageLimits(max_jpeg_scans=10**6)
    probe = hostile.scan_repeating_jpeg(20, (1000, 1000))
    walls = []
    for _ in range(3):  # the least of three, in the worker itself: its wall clock per scan
        started = time.monotonic()
        pool.load_batch([probe] * 4, PRE, unbounded_scans)
        walls.append((time.monotonic() - started) / 4 / 20)
    image = hostile.scan_repeating_jpeg(max(1, round(0.05 / min(walls))), (1000, 1000))  # ~0.05 s
    # 0.2 s of CPU an image, so 1 s of wall clock from each image's start; 60 images ~ 3 s.
    limits = ImageLimits(max_decode_cpu_s=0.2, max_jpeg_scans=10**6)
    started = time.monotonic()
    assert pool.load_batch([image] * 60, PRE, limits).shape == (60, 3, 32, 32)
    assert time.monotonic() - started > 1.5  # well past one image's deadline: it restarted


def _catch(errors: list[Exception], fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 (the test inspects it)
        errors.append(exc)


@pytest.mark.slow
def test_cpu_and_memory_limits_stop_the_decoder_and_close_stops_the_worker(pool: DecodePool) -> None:
    # No scan cap here: the CPU limit alone must stop a JPEG of 3000 scans (57 s unbounded).
    tight = ImageLimits(max_decode_cpu_s=1, max_decode_memory=MEMORY, max_jpeg_scans=10**6)
    started = time.monotonic()
    with pytest.raises(TooLarge, match="image 0: decoding needs more than 1 s of CPU"):
        pool.load_batch([hostile.scan_repeating_jpeg(3000, (2000, 2000))], PRE, tight)
    assert time.monotonic() - started < 4
    with pytest.raises(TooLarge, match="image 0: decoding needs more"):
        pool.load_batch([hostile.lossless_webp_bomb((6300, 6300))], PRE, tight)
    pid = pool.processes[0].pid
    assert pid is not None
    limits_text = Path(f"/proc/{pid}/limits").read_text()
    assert "Max core file size        0" in limits_text
    pool.close()
    assert pool.processes[0].pid is None and not Path(f"/proc/{pid}").exists()


# -- stored copies --------------------------------------------------------------------------------


def _photo_with_gps_and_comment(fmt: str) -> bytes:
    image = Image.new("RGB", (120, 80), (200, 30, 40))
    exif = Image.Exif()
    exif[0x010E] = "secret description"  # ImageDescription
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (51.0, 30.0, 12.5), 3: "W", 4: (0.0, 7.0, 39.0)})
    out = io.BytesIO()
    if fmt == "JPEG":
        image.save(out, format="JPEG", exif=exif, comment=b"secret comment", quality=95)
    else:
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", "secret comment")
        image.save(out, format="PNG", exif=exif, pnginfo=info)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_stored_copies_carry_no_gps_exif_or_comment(fmt: str) -> None:
    data = _photo_with_gps_and_comment(fmt)
    original = Image.open(io.BytesIO(data))
    assert original.getexif().get_ifd(0x8825) and b"secret" in data
    stored = bounded_copy(data)
    assert b"secret" not in stored and b"Exif" not in stored
    copy = Image.open(io.BytesIO(stored))
    assert not copy.getexif() and "comment" not in copy.info and "icc_profile" not in copy.info
    # The pixels are the very ones of the upload (JPEG: same entropy-coded data; PNG: lossless).
    assert np.array_equal(np.asarray(copy.convert("RGB")), np.asarray(original.convert("RGB")))


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the copy must be decoded upright, not kept as uploaded
    out = io.BytesIO()
    Image.new("RGB", (60, 40), (200, 30, 40)).save(out, format="JPEG", exif=exif)
    return out.getvalue()


def test_the_workers_copies_are_bounded_copys(pool: DecodePool) -> None:
    """The worker keeps a small upright JPEG as uploaded from the header it opened for the model
    (no second parse); every copy must still be what :func:`bounded_copy` makes of the bytes."""
    uploads = [
        _photo_with_gps_and_comment("JPEG"),  # small, upright: kept, metadata stripped
        _rotated_jpeg(),  # small but rotated: decoded
        _photo_with_gps_and_comment("PNG"),  # small PNG: re-encoded as PNG
        samples.encode(Image.new("RGB", (900, 600), (10, 120, 200)), "JPEG"),  # over the bounds: scaled
    ]
    _, copies = pool.load_batch_and_copies(uploads, PRE, ImageLimits())
    assert copies == [bounded_copy(data) for data in uploads]
    assert copies[0] != uploads[0] and Image.open(io.BytesIO(copies[1])).size == (40, 60)


def test_a_scaled_down_copy_carries_no_comment_or_profile() -> None:
    """Over the stored bounds the copy is re-encoded from pixels; Pillow would carry a JPEG's
    comment over into the new file unless the copy drops it."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = io.BytesIO()
    Image.new("RGB", (900, 600), (10, 120, 200)).save(
        out, format="JPEG", comment=b"secret comment", icc_profile=icc, quality=90
    )
    stored = bounded_copy(out.getvalue())
    copy = Image.open(io.BytesIO(stored))
    assert copy.size == (576, 384)
    assert b"secret" not in stored and b"ICC_PROFILE" not in stored
    assert not {"comment", "icc_profile", "exif"} & set(copy.info)


# -- over a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(private_redis, tiny_model_path: Path) -> Iterator[ServerStack]:
    settings = stack_settings(
        tiny_model_path,
        private_redis.url,
        redis_key_prefix="decode-isolation",
        decode_workers=1,
        decode_queue=2,
        decode_memory=MEMORY,
        decode_cpu_s=CPU_S,
    )
    with ServerStack(settings) as running:
        yield running


@pytest.fixture
def http(stack: ServerStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=60) as client:
        yield client


BOMBS = {
    "webp-lossless": lambda: hostile.lossless_webp_bomb((6300, 6300)),
    "png-rgba": lambda: hostile.flat("PNG", (6300, 6300), "RGBA"),
    "gif": lambda: hostile.flat("GIF", (6300, 6300), "L"),
    "tiff-deflate": lambda: hostile.flat("TIFF", (6300, 6300), "RGBA", compression="tiff_adobe_deflate"),
    "bmp-rle": lambda: hostile.rle_bmp_bomb((6000, 6000)),
    "jpeg-stray-byte": lambda: hostile.stray_byte_jpeg(3000, (2000, 2000)),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_of_every_accepted_format_are_413_and_the_server_stays_small(
    http: httpx.Client, name: str
) -> None:
    data = BOMBS[name]()
    before = rss(os.getpid())  # the server runs in this process
    started = time.monotonic()
    response = http.post("/v1/embed", files=[("files", ("bomb", data, "application/octet-stream"))])
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "too_large" and "image 0" in response.json()["message"]
    assert time.monotonic() - started < 10
    assert rss(os.getpid()) - before < 64 * MiB  # the decoded image never entered the server
    ok = http.post("/v1/embed", files=[("files", ("ok.png", samples.solid_png((9, 9, 9)), "image/png"))])
    assert ok.status_code == 200 and http.get("/readyz").status_code == 200


def _refused_formats() -> dict[str, bytes]:
    made = {"ico-huge-png": hostile.ico_with_huge_png(3000)}
    for fmt in ("TGA", "JPEG2000", "QOI", "PCX", "PPM"):
        try:
            made[fmt] = samples.encode(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)
        except (KeyError, OSError):  # this Pillow cannot write it; the others still run
            continue
    return made


def test_formats_outside_the_allowlist_are_415_over_rest_and_invalid_argument_over_grpc(
    http: httpx.Client, stack: ServerStack
) -> None:
    refused = _refused_formats()
    assert {"ico-huge-png", "TGA"} <= set(refused)
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = fewshot_pb2_grpc.FewShotStub(channel)
        for name, data in refused.items():
            response = http.post("/v1/embed", files=[("files", ("x", data, "application/octet-stream"))])
            assert response.status_code == 415, (name, response.text)
            assert "send one of JPEG, PNG, WEBP, GIF, BMP, TIFF" in response.json()["message"]
            with pytest.raises(grpc.RpcError) as caught:
                stub.Embed(fewshot_pb2.EmbedRequest(images=[data]), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name


@pytest.mark.slow
def test_an_uploads_two_decodes_share_one_images_cpu_budget(pool: DecodePool) -> None:
    """An example upload decodes each image twice (model input, stored copy) in one worker job:
    together they get the image's CPU budget, not one budget each."""
    from fewshot_common.images import load_batch

    probe = hostile.empty_chunk_png(2)
    costs = []
    for _ in range(3):  # the least of three: a busy moment only ever inflates CPU time
        started = time.process_time()
        load_batch([probe], PRE, ImageLimits())
        costs.append(time.process_time() - started)
    per_megabyte = min(costs) / 2
    png = hostile.empty_chunk_png(max(1, round(0.6 / per_megabyte)))  # one decode: ~0.6 s of CPU
    limits = ImageLimits(max_decode_cpu_s=1)
    assert pool.load_batch([png], PRE, limits).shape == (1, 3, 32, 32)  # one decode fits
    with pytest.raises(TooLarge, match="image 0: decoding needs more than 1 s of CPU"):
        pool.load_batch_and_copies([png], PRE, limits)
    batch, [copy] = pool.load_batch_and_copies([samples.solid_png((7, 8, 9))], PRE, limits)
    assert batch.shape == (1, 3, 32, 32) and copy.startswith(b"\x89PNG")
