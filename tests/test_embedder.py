"""ONNX Runtime embedder on a real exported model, and the dynamic batcher in front of it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from fewshot_common.embedder import Embedder, InvalidModel, default_providers
from fewshot_common.errors import ImageError, Unavailable
from fewshot_common.modelmeta import METADATA_KEY, ModelMeta
from fewshot_service.core.batcher import BatchConfig, DynamicBatcher

import image_samples as samples


@pytest.fixture(scope="module")
def embedder(tiny_model_path: Path) -> Embedder:
    return Embedder(tiny_model_path, intra_op_threads=1)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [samples.noise_png(seed) for seed in range(6)]


def test_loads_the_model_metadata(embedder: Embedder, tiny_model_path: Path) -> None:
    stored = onnx.load(str(tiny_model_path)).metadata_props
    meta = ModelMeta.from_json(next(p.value for p in stored if p.key == METADATA_KEY))
    assert embedder.meta == meta
    assert embedder.model_id == meta.model_id and embedder.model_id.startswith("vit_test_p8_32-")
    assert embedder.embedding_dim == 64
    assert embedder.providers == ["CPUExecutionProvider"]


def test_default_providers_prefer_accelerators_and_end_with_cpu() -> None:
    providers = default_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert "AzureExecutionProvider" not in providers  # available here, but not an accelerator


def test_embeddings_are_unit_norm_and_deterministic(embedder: Embedder, images: list[bytes]) -> None:
    first = embedder.embed_images(images)
    assert first.shape == (6, 64) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(embedder.embed_images(images), first)
    # Different images give different vectors (a constant model would pass the checks above).
    assert np.abs(first[0] - first[1]).max() > 1e-3


def test_batch_equals_single(embedder: Embedder, images: list[bytes]) -> None:
    batch = embedder.embed_images(images)
    singles = np.concatenate([embedder.embed_images([image]) for image in images])
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_large_inputs_are_chunked_by_max_batch_size(
    tiny_model_path: Path, embedder: Embedder, images: list[bytes]
) -> None:
    small_batches = Embedder(tiny_model_path, max_batch_size=4, intra_op_threads=1)
    pixels = embedder.load_images(images * 2)  # 12 images: chunks of 4, 4, 4
    np.testing.assert_allclose(small_batches.embed_array(pixels), embedder.embed_array(pixels), atol=1e-5)


def test_embed_paths_equals_embed_images(embedder: Embedder, images: list[bytes], tmp_path: Path) -> None:
    paths = []
    for i, data in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    np.testing.assert_allclose(embedder.embed_paths(paths), embedder.embed_images(images), atol=1e-6)


def test_embed_paths_names_the_bad_file(embedder: Embedder, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = tmp_path / "good.png"
    good.write_bytes(samples.noise_png(0))
    with pytest.raises(ImageError, match=r"image 1: .*broken\.jpg: not a decodable image"):
        embedder.embed_paths([good, bad])


def _rewrite(source: Path, target: Path, edit) -> Path:
    model = onnx.load(str(source))
    edit(model)
    onnx.save(model, str(target))
    return target


def test_refuses_a_model_without_fewshot_metadata(tiny_model_path: Path, tmp_path: Path) -> None:
    path = _rewrite(tiny_model_path, tmp_path / "bare.onnx", lambda m: m.ClearField("metadata_props"))
    with pytest.raises(InvalidModel, match="no 'fewshot' metadata"):
        Embedder(path)


def test_refuses_a_graph_that_contradicts_its_metadata(tiny_model_path: Path, tmp_path: Path) -> None:
    def claim_24_pixels(model: onnx.ModelProto) -> None:
        meta = ModelMeta.from_metadata_props({p.key: p.value for p in model.metadata_props})
        wrong = replace(meta, preprocess=replace(meta.preprocess, input_size=24))
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, wrong.to_metadata_props())

    path = _rewrite(tiny_model_path, tmp_path / "wrong.onnx", claim_24_pixels)
    expected = r"has shape \[.*3, 32, 32\]; the metadata needs \[batch, 3, 24, 24\]"
    with pytest.raises(InvalidModel, match=expected):
        Embedder(path)


def test_refuses_files_that_are_not_models(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf")
    with pytest.raises(InvalidModel, match="not a loadable ONNX model"):
        Embedder(junk)
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Embedder(tmp_path / "missing.onnx")


# --- dynamic batcher ---------------------------------------------------------------------------


class RecordingRun:
    """The real embedder's run, noting the size of every batch it was given."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.batch_sizes: list[int] = []

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(pixels))
        return self.embedder.embed_array(pixels)


def _submit_together(batcher: DynamicBatcher, requests: list[np.ndarray]) -> list[np.ndarray]:
    results: list[np.ndarray | None] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def worker(i: int) -> None:
        start.wait()
        results[i] = batcher.submit(requests[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results  # type: ignore[return-value]


@pytest.mark.parametrize("workers", [1, 2])
def test_batcher_merges_concurrent_requests_and_returns_each_its_rows(
    embedder: Embedder, images: list[bytes], workers: int
) -> None:
    # The first run is held a moment, as a real model's would be: on a loaded machine a run of the
    # tiny test model could end before the next caller's thread got to submit, and nothing merge.
    run = GatedRun(embedder)
    batcher = DynamicBatcher(run, BatchConfig(max_queue_delay_ms=200, workers=workers))
    try:
        requests = [embedder.load_images(images[i : i + 1 + i % 2]) for i in range(5)]  # 1-2 images each

        def release_soon() -> None:
            run.first_started.wait(30)
            time.sleep(0.3)  # the other callers submit meanwhile
            run.release.set()

        threading.Thread(target=release_soon, daemon=True).start()
        results = _submit_together(batcher, requests)
    finally:
        run.release.set()
        batcher.close()
    for request, result in zip(requests, results):
        np.testing.assert_allclose(result, embedder.embed_array(request), atol=1e-5)
    assert sum(run.batch_sizes) == sum(len(r) for r in requests)
    assert len(run.batch_sizes) < len(requests), run.batch_sizes  # some runs were merged


def test_batcher_respects_max_batch_size_without_splitting_requests(
    embedder: Embedder, images: list[bytes]
) -> None:
    run = RecordingRun(embedder)
    batcher = DynamicBatcher(run, BatchConfig(max_batch_size=4, max_queue_delay_ms=100, workers=1))
    try:
        requests = [embedder.load_images(images[:3]) for _ in range(4)] + [embedder.load_images(images)]
        results = _submit_together(batcher, requests)
    finally:
        batcher.close()
    # Requests of 3 never share a batch of 4; the request of 6 runs alone, whole.
    assert sorted(run.batch_sizes) == [3, 3, 3, 3, 6]
    np.testing.assert_allclose(results[-1], embedder.embed_array(requests[-1]), atol=1e-5)


class GatedRun:
    """A run that holds its first batch until released, so a test controls when the model is busy."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.batch_sizes: list[int] = []
        self.first_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(pixels))
        if len(self.batch_sizes) == 1:
            self.first_started.set()
            self.release.wait(30)
        return self.embedder.embed_array(pixels)


def test_batcher_runs_a_lone_request_at_once_when_the_model_is_idle(
    embedder: Embedder, images: list[bytes]
) -> None:
    """Waiting for company only pays while the model is busy: an idle model runs what it has."""
    batcher = DynamicBatcher(embedder.embed_array, BatchConfig(max_queue_delay_ms=20_000, workers=1))
    try:
        started = time.monotonic()
        batcher.submit(embedder.load_images(images[:1]))
        assert time.monotonic() - started < 10  # not the 20 s delay
    finally:
        batcher.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_batcher_gathers_requests_that_arrive_while_a_batch_runs(
    embedder: Embedder, images: list[bytes], workers: int
) -> None:
    run = GatedRun(embedder)
    batcher = DynamicBatcher(run, BatchConfig(max_queue_delay_ms=20_000, workers=workers))
    requests = [embedder.load_images(images[i : i + 1]) for i in range(4)]
    results: list[np.ndarray | None] = [None] * 4

    def submit(i: int) -> None:
        results[i] = batcher.submit(requests[i])

    try:
        threads = [threading.Thread(target=submit, args=(0,))]
        threads[0].start()
        assert run.first_started.wait(30)  # the model is busy with request 0 alone
        threads += [threading.Thread(target=submit, args=(i,)) for i in (1, 2, 3)]
        for thread in threads[1:]:
            thread.start()
        if workers == 1:  # the only worker is busy: all three wait in the queue
            deadline = time.monotonic() + 30
            while len(batcher._queue) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
        else:  # the second worker gathers them as they come, while the first batch runs
            time.sleep(0.5)
        run.release.set()
        for thread in threads:
            thread.join(30)
    finally:
        batcher.close()
    assert run.batch_sizes == [1, 3]  # no 20 s wait either: the model went idle, so it ran
    for request, result in zip(requests, results):
        np.testing.assert_allclose(result, embedder.embed_array(request), atol=1e-5)


def test_an_idle_batcher_runs_a_lone_request_on_the_callers_thread(
    embedder: Embedder, images: list[bytes]
) -> None:
    threads: list[threading.Thread] = []

    def run(pixels: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread())
        return embedder.embed_array(pixels)

    batcher = DynamicBatcher(run, BatchConfig(workers=2))
    try:
        one = embedder.load_images(images[:1])
        np.testing.assert_allclose(batcher.run_if_idle(one), embedder.embed_array(one), atol=1e-5)
        assert threads == [threading.current_thread()]
        assert batcher.run_if_idle(embedder.load_images(images[:4])) is None  # split, not run here
        assert threads == [threading.current_thread()]
    finally:
        batcher.close()
    assert DynamicBatcher(run, BatchConfig(enabled=False)).run_if_idle(one) is None


@contextlib.contextmanager
def model_held_by_a_callers_run(
    embedder: Embedder, images: list[bytes], config: BatchConfig
) -> Iterator[tuple[GatedRun, DynamicBatcher, np.ndarray]]:
    """A batcher whose model is busy with a caller's own run (``run_if_idle`` on another thread)
    until ``run.release`` is set; yields the run, the batcher and a one-image request."""
    run = GatedRun(embedder)
    batcher = DynamicBatcher(run, config)
    one = embedder.load_images(images[:1])
    caller = threading.Thread(target=batcher.run_if_idle, args=(one,))
    try:
        caller.start()
        assert run.first_started.wait(30)
        yield run, batcher, one
    finally:
        run.release.set()
        caller.join(30)
        batcher.close()


def test_a_callers_own_run_counts_against_the_workers(embedder: Embedder, images: list[bytes]) -> None:
    """While a caller's run holds the model, a busy batcher queues the next request, and its one
    worker starts it only after that run: never more runs at once than workers."""
    config = BatchConfig(max_queue_delay_ms=0, workers=1)
    with model_held_by_a_callers_run(embedder, images, config) as (run, batcher, one):
        assert batcher.run_if_idle(one) is None  # busy: the caller must queue instead
        queued = batcher.start(one)
        time.sleep(0.3)
        assert run.batch_sizes == [1]  # the idle worker did not start a second run beside it
        run.release.set()
        np.testing.assert_allclose(queued(), embedder.embed_array(one), atol=1e-5)
        assert run.batch_sizes == [1, 1]


def test_a_request_gathering_behind_a_callers_run_goes_when_that_run_ends(
    embedder: Embedder, images: list[bytes]
) -> None:
    """A worker waits for company only while the model is busy: the end of a caller's own run
    wakes it, instead of leaving it to sit out the (here 20 s) delay."""
    config = BatchConfig(max_queue_delay_ms=20_000, workers=2)
    with model_held_by_a_callers_run(embedder, images, config) as (run, batcher, one):
        queued = batcher.start(one)
        deadline = time.monotonic() + 10
        while not batcher._gathering and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher._gathering == 1  # a worker holds the request, waiting for company
        run.release.set()
        released = time.monotonic()
        queued()
        assert time.monotonic() - released < 10


def test_requests_queued_behind_a_callers_run_are_gathered_into_one_batch(
    embedder: Embedder, images: list[bytes]
) -> None:
    """One worker gathers behind a caller's run; the other does not start a second, half batch."""
    config = BatchConfig(max_queue_delay_ms=20_000, workers=2)
    with model_held_by_a_callers_run(embedder, images, config) as (run, batcher, one):
        waits = []
        for _ in range(3):
            waits.append(batcher.start(one))
            time.sleep(0.1)  # each arrives while the first worker is gathering
        run.release.set()
        for wait in waits:
            np.testing.assert_allclose(wait(), embedder.embed_array(one), atol=1e-5)
    assert run.batch_sizes == [1, 3]


class PairedRun:
    """A run that proceeds only once two runs are in the model at once (a barrier of two)."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.batch_sizes: list[int] = []
        self.together = threading.Barrier(2, timeout=30)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(pixels))
        self.together.wait()  # BrokenBarrierError, and a failed request, if the other part waits
        return self.embedder.embed_array(pixels)


@pytest.mark.slow
def test_batcher_runs_the_parts_of_a_multi_image_request_side_by_side(
    embedder: Embedder, images: list[bytes]
) -> None:
    """With two workers, a 6-image request becomes two runs of 3 that are in the model at once."""
    run = PairedRun(embedder)
    batcher = DynamicBatcher(run, BatchConfig(max_queue_delay_ms=20_000, workers=2))
    try:
        request = embedder.load_images(images[:6])
        result = batcher.submit(request)
    finally:
        batcher.close()
    assert sorted(run.batch_sizes) == [3, 3]
    np.testing.assert_allclose(result, embedder.embed_array(request), atol=1e-5)


def test_batcher_never_merges_two_parts_of_one_request(embedder: Embedder, images: list[bytes]) -> None:
    """One worker busy: the other runs the request's parts one after the other, never as one batch."""
    run = GatedRun(embedder)
    batcher = DynamicBatcher(run, BatchConfig(max_queue_delay_ms=0, workers=2))
    first = embedder.load_images(images[:1])
    request = embedder.load_images(images[1:5])
    results: list[np.ndarray | None] = [None, None]

    def submit(i: int, pixels: np.ndarray) -> None:
        results[i] = batcher.submit(pixels)

    try:
        busy = threading.Thread(target=submit, args=(0, first))
        busy.start()
        assert run.first_started.wait(30)  # one worker holds the model
        split = threading.Thread(target=submit, args=(1, request))
        split.start()
        split.join(30)  # the other worker answers both parts meanwhile
        assert not split.is_alive()
        run.release.set()
        busy.join(30)
    finally:
        batcher.close()
    assert run.batch_sizes == [1, 2, 2]
    np.testing.assert_allclose(results[1], embedder.embed_array(request), atol=1e-5)
    np.testing.assert_allclose(results[0], embedder.embed_array(first), atol=1e-5)


def test_batcher_reports_failures_to_every_caller_in_the_batch(embedder: Embedder) -> None:
    batcher = DynamicBatcher(embedder.embed_array, BatchConfig(max_queue_delay_ms=0))
    try:
        wrong_shape = np.zeros((1, 3, 16, 16), dtype=np.float32)
        with pytest.raises(Exception, match="[Ii]nvalid|dimension"):
            batcher.submit(wrong_shape)
        # The worker survives a failed batch.
        good = embedder.load_images([samples.noise_png(0)])
        np.testing.assert_allclose(batcher.submit(good), embedder.embed_array(good), atol=1e-5)
    finally:
        batcher.close()
    with pytest.raises(Unavailable, match="shutting down"):
        batcher.submit(good)


def test_disabled_batcher_runs_each_request_alone(embedder: Embedder, images: list[bytes]) -> None:
    run = RecordingRun(embedder)
    batcher = DynamicBatcher(run, BatchConfig(enabled=False))
    requests = [embedder.load_images([image]) for image in images[:4]]
    results = _submit_together(batcher, requests)
    batcher.close()
    assert run.batch_sizes == [1, 1, 1, 1]
    for request, result in zip(requests, results):
        np.testing.assert_allclose(result, embedder.embed_array(request), atol=1e-5)
