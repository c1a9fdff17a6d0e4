"""Prototype top-k (fewshot_service.classify.prototypes) and FewShotCore on a real model and a real Redis."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis

from fewshot_common.embedder import Embedder
from fewshot_common.errors import FailedPrecondition, ImageError, InvalidInput, ModelIncomplete, NotFound
from fewshot_common.vectors import l2_normalize
from fewshot_service.classify.prototypes import (
    INT8_SCAN_MIN_CLASSES,
    Prediction,
    PrototypeMatrix,
    ScanStats,
    blas_error_bound,
    exact_scores,
)
from fewshot_service.core.batcher import BatchConfig
from fewshot_service.core.core import FewShotCore
from fewshot_service.names import resolve_namespace, resolve_top_k
from fewshot_service.registry.registry import Registry

import image_samples as samples


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_scores_are_cosine_to_the_renormalised_prototype() -> None:
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(5, 8)).astype(np.float32) * 3  # not unit norm
    queries = unit(rng.normal(size=(2, 8)))
    top = PrototypeMatrix([f"c{i}" for i in range(5)], prototypes).top_k(queries, 5)
    expected = queries @ unit(prototypes).T
    for query, predictions in enumerate(top):
        assert [p.label for p in predictions] == [f"c{i}" for i in np.argsort(-expected[query])]
        np.testing.assert_allclose([p.score for p in predictions], np.sort(expected[query])[::-1], atol=1e-6)


def test_ties_are_ordered_by_label_whatever_the_input_order() -> None:
    vector = np.array([[1.0, 0.0]], dtype=np.float32)
    same = np.array([0.6, 0.8], dtype=np.float32)
    labels = ["pear", "apple", "fig", "best", "kiwi"]
    matrix = np.stack([same, same, same, [1.0, 0.0], same])
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        top = PrototypeMatrix([labels[i] for i in order], matrix[order]).top_k(vector, 3)[0]
        # "kiwi" and "pear" tie with the third place too, and lose on the label.
        assert [p.label for p in top] == ["best", "apple", "fig"]
        assert top[1].score == top[2].score == pytest.approx(0.6)


def test_top_k_larger_than_the_class_count_returns_every_class() -> None:
    matrix = PrototypeMatrix(["a", "b"], np.eye(2, dtype=np.float32))
    assert [p.label for p in matrix.top_k(np.array([[0.0, 1.0]], np.float32), 10)[0]] == ["b", "a"]


def test_thousands_of_classes_match_a_full_sort() -> None:
    rng = np.random.default_rng(3)
    labels = [f"class-{i:05d}" for i in range(5000)]
    matrix = PrototypeMatrix(labels, rng.normal(size=(5000, 64)).astype(np.float32))
    queries = unit(rng.normal(size=(4, 64)))
    for query, predictions in zip(queries, matrix.top_k(queries, 7)):
        row = exact_scores(matrix.matrix, query)
        best = np.lexsort((np.arange(len(row)), -row))[:7]
        assert [p.label for p in predictions] == [matrix.labels[i] for i in best]
        assert [p.score for p in predictions] == row[best].tolist()


def assert_same_classes(patched: PrototypeMatrix, rebuilt: PrototypeMatrix, queries: np.ndarray) -> None:
    assert patched.labels == rebuilt.labels
    np.testing.assert_allclose(patched.prototypes, rebuilt.prototypes, atol=1e-6)
    np.testing.assert_allclose(patched.matrix, rebuilt.matrix, atol=1e-6)
    k = len(rebuilt) + 3  # every class, in order: ties and masked-out rows included
    assert patched.top_k(queries, k) == rebuilt.top_k(queries, k)


def test_patched_versions_equal_a_rebuild_and_leave_older_versions_as_they_were() -> None:
    rng = np.random.default_rng(4)
    classes = {f"c{i:03d}": rng.normal(size=8).astype(np.float32) for i in range(40)}
    current = PrototypeMatrix(list(classes), np.stack(list(classes.values())))
    queries = unit(rng.normal(size=(3, 8)))
    # Rounds of replacements, deletions and new classes, past a buffer regrowth and compactions.
    for round_ in range(60):
        before, before_top = current, current.top_k(queries, 5)
        changes: dict[str, np.ndarray | None] = {}
        for label in rng.choice(sorted(classes), size=3, replace=False):
            changes[str(label)] = None if rng.random() < 0.3 else rng.normal(size=8).astype(np.float32)
        changes[f"new{round_:03d}"] = rng.normal(size=8).astype(np.float32)
        # A tie with an existing class: broken by label, whatever slot the row went to.
        changes[f"a-twin{round_:03d}"] = classes[min(classes)] * 2
        current = current.patched(changes)
        for label, row in changes.items():
            if row is None:
                classes.pop(label)
            else:
                classes[label] = row
        rebuilt = PrototypeMatrix(list(classes), np.stack(list(classes.values())))
        assert_same_classes(current, rebuilt, queries)
        assert before.top_k(queries, 5) == before_top  # readers of the old version unaffected
    assert current.dead_rows <= max(len(current), 64)  # compacted, not growing without bound


def test_two_versions_patched_from_the_same_one_do_not_share_rows() -> None:
    base = PrototypeMatrix(["a", "b"], np.eye(2, dtype=np.float32))
    left = base.patched({"c": np.array([0.6, 0.8], np.float32)})
    right = base.patched({"c": np.array([0.8, 0.6], np.float32), "a": None})
    query = np.array([[1.0, 0.0]], np.float32)
    assert [(p.label, round(p.score, 3)) for p in left.top_k(query, 3)[0]] == [
        ("a", 1.0),
        ("c", 0.6),
        ("b", 0.0),
    ]
    assert [(p.label, round(p.score, 3)) for p in right.top_k(query, 3)[0]] == [("c", 0.8), ("b", 0.0)]
    assert [p.label for p in base.top_k(query, 5)[0]] == ["a", "b"]


def test_dimension_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="embedding size 3 does not match prototypes of size 2"):
        PrototypeMatrix(["a"], np.ones((1, 2), np.float32)).top_k(np.ones((1, 3), np.float32), 1)


def test_request_parameters() -> None:
    assert resolve_namespace("") == "default"
    assert resolve_namespace(None) == "default"
    assert resolve_namespace("shop/🐱 {x}") == "shop/🐱 {x}"
    with pytest.raises(InvalidInput, match="at most 128 characters"):
        resolve_namespace("n" * 129)
    assert resolve_top_k(0) == 5
    assert resolve_top_k(17) == 17
    for bad in (-1, 1001):
        with pytest.raises(InvalidInput, match="top_k must be between 0 and 1000"):
            resolve_top_k(bad)


# --- FewShotCore: a real exported model, a real private Redis ---------------------------------


@pytest.fixture(scope="module")
def embedder(tiny_model_path: Path) -> Embedder:
    return Embedder(tiny_model_path, intra_op_threads=1)


@pytest.fixture
def core(embedder: Embedder, redis_client: redis.Redis):
    core = FewShotCore(embedder, Registry(redis_client))
    yield core
    core.close()


COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 30, 220)}


def shots(rgb: tuple[int, int, int], n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [
        samples.solid_png(tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in rgb))
        for _ in range(n)
    ]


def test_core_classifies_held_out_images_of_added_classes(core: FewShotCore) -> None:
    for seed, (label, rgb) in enumerate(COLOURS.items()):
        info = core.add_examples("", label, shots(rgb, 5, seed))
        assert info.label == label and info.count == 5
    labels = list(COLOURS)
    held_out = [shots(COLOURS[label], 1, 100 + i)[0] for i, label in enumerate(labels)]
    results = core.classify(held_out, "", 0)
    assert [r[0].label for r in results] == labels
    assert all(len(r) == 3 for r in results)  # top_k 0 means 5, and there are only 3 classes
    for predictions in results:
        scores = [p.score for p in predictions]
        assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0001


def test_add_examples_with_one_bad_file_adds_nothing(core: FewShotCore) -> None:
    images = [*shots(COLOURS["red"], 2, 0), b"broken", *shots(COLOURS["red"], 1, 1)]
    with pytest.raises(ImageError, match="image 2: "):
        core.add_examples("", "red", images)
    with pytest.raises(NotFound):
        core.get_class("", "red")
    assert core.list_classes("") == []


def test_classify_without_classes_fails_before_embedding(core: FewShotCore) -> None:
    # The image is broken: the namespace check must come first (and cost no inference).
    with pytest.raises(FailedPrecondition, match="no classes"):
        core.classify([b"broken"], "empty-ns", 3)


@pytest.mark.parametrize("batching", [True, False])
def test_a_known_namespace_is_checked_beside_the_inference_an_unknown_one_before(
    embedder: Embedder, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, batching: bool
) -> None:
    """With batching the check runs on the caller's thread while a worker runs the model; without,
    on a thread of its own while the caller runs it."""
    core = FewShotCore(embedder, Registry(redis_client), batching=BatchConfig(enabled=batching))
    try:
        _check_beside_the_inference(core, monkeypatch)
    finally:
        core.close()


def _check_beside_the_inference(core: FewShotCore, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    core.add_examples("", "red", shots(COLOURS["red"], 2, 0))
    image = shots(COLOURS["red"], 1, 9)
    embed_started, events = threading.Event(), []
    real_prototypes, real_run = core.registry.prototypes, core._batcher._run
    overlap_expected = False

    def prototypes(*args, **kwargs):
        # When the check runs beside the inference, it sees the inference start while it runs;
        # run before it (sequentially), it would wait here in vain.
        events.append(("check sees the inference", overlap_expected and embed_started.wait(timeout=10)))
        return real_prototypes(*args, **kwargs)

    def run(pixels):  # the model run, on whichever thread the batcher runs it
        events.append("inference")
        embed_started.set()
        return real_run(pixels)

    monkeypatch.setattr(core.registry, "prototypes", prototypes)
    monkeypatch.setattr(core._batcher, "_run", run)
    core.registry.prototype_cache.clear()  # as on a replica that never answered for this namespace
    assert [p.label for p in core.classify(image, "", 1)[0]] == ["red"]
    assert events == [("check sees the inference", False), "inference"]  # the check, then inference
    events.clear(), embed_started.clear()
    overlap_expected = True  # the namespace is known now
    assert [p.label for p in core.classify(image, "", 1)[0]] == ["red"]
    assert ("check sees the inference", True) in events and "inference" in events
    core.delete_class("", "red")  # known, but it can no longer answer: the same error as ever
    with pytest.raises(FailedPrecondition, match="no classes"):
        core.classify(image, "", 1)


def test_an_embed_with_the_model_idle_runs_on_the_requests_own_thread(
    embedder: Embedder, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    core = FewShotCore(embedder, Registry(redis_client), batching=BatchConfig(workers=2))
    threads: list[threading.Thread] = []
    real_run = core._batcher._run

    def run(pixels):
        threads.append(threading.current_thread())
        return real_run(pixels)

    monkeypatch.setattr(core._batcher, "_run", run)
    try:
        core.embed(shots(COLOURS["red"], 1, 0))
        assert threads == [threading.current_thread()]  # no hand-off to a worker and back
        core.embed(shots(COLOURS["red"], 4, 0))  # several images: split across both workers
        assert len(threads) == 3 and threading.current_thread() not in threads[1:]
    finally:
        core.close()


def test_namespaces_are_separate(core: FewShotCore) -> None:
    core.add_examples("a", "red", shots(COLOURS["red"], 2, 0))
    core.add_examples("b", "blue", shots(COLOURS["blue"], 2, 0))
    image = shots(COLOURS["red"], 1, 9)
    assert [p.label for p in core.classify(image, "a", 5)[0]] == ["red"]
    assert [p.label for p in core.classify(image, "b", 5)[0]] == ["blue"]


def test_a_change_is_seen_by_the_next_classify(core: FewShotCore) -> None:
    core.add_examples("", "red", shots(COLOURS["red"], 2, 0))
    image = shots(COLOURS["blue"], 1, 9)
    assert [p.label for p in core.classify(image, "", 5)[0]] == ["red"]
    # Unchanged namespace: the prepared matrix is reused, not rebuilt per request.
    assert core._prototype_matrix("default") is core._prototype_matrix("default")
    core.add_examples("", "blue", shots(COLOURS["blue"], 2, 1))
    assert core.classify(image, "", 5)[0][0].label == "blue"
    core.delete_class("", "blue")
    assert [p.label for p in core.classify(image, "", 5)[0]] == ["red"]


def test_another_models_examples_are_embedded_on_demand_or_refused_with_the_reason(
    core: FewShotCore, redis_client: redis.Redis, other_model_path: Path
) -> None:
    core.add_examples("", "red", shots(COLOURS["red"], 2, 0))
    core.add_examples("", "green", shots(COLOURS["green"], 2, 1))
    other = FewShotCore(Embedder(other_model_path, intra_op_threads=1), Registry(redis_client))
    blind = FewShotCore(core.embedder, Registry(redis_client), store_images=False)
    try:
        assert other.model_id != core.model_id
        # The other model embeds the 4 examples from their stored images, then classifies.
        assert other.classify(shots(COLOURS["red"], 1, 9), "", 1)[0][0].label == "red"
        assert other.registry.status("default", other.model_id).embedded == 4
        # An example stored without its image cannot be embedded by the other model.
        blind.add_examples("", "blue", shots(COLOURS["blue"], 1, 2))
        with pytest.raises(
            ModelIncomplete,
            match=r"4 of 5 examples embedded for model .*1 examples "
            rf"have no stored image.*{core.model_id}' \(5 of 5\)",
        ) as refused:
            other.classify(shots(COLOURS["red"], 1, 1), "", 5)
        assert refused.value.progress == {
            "model_id": other.model_id,
            "embedded": 4,
            "total": 5,
            "without_image": 1,
            "backfilling": False,
        }
        # Asked again with nothing changed, the answer comes from the recorded finding: the
        # namespace's classes are not read again (one HGETALL: the state, for the message).
        redis_client.config_resetstat()
        with pytest.raises(ModelIncomplete, match="4 of 5"):
            other.classify(shots(COLOURS["red"], 1, 1), "", 5)
        assert redis_client.info("commandstats")["cmdstat_hgetall"]["calls"] == 1
        assert core.classify(shots(COLOURS["blue"], 1, 3), "", 1)[0][0].label == "blue"  # its own model
    finally:
        other.close()
        blind.close()


def test_ready_follows_redis(embedder: Embedder, tmp_path: Path) -> None:
    from fewshot_service.registry.redis_server import ManagedRedis

    server = ManagedRedis(tmp_path / "redis", persistent=False)
    server.start()
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=1)
    core = FewShotCore(embedder, Registry(client))
    try:
        assert core.ready()
        server.stop()
        assert not core.ready()
    finally:
        core.close()
        client.close()
        server.stop()


# Names are checked by the core alone (the registry trusts it), before any inference or Redis call.
@pytest.mark.parametrize(
    "label", ["", "x" * 129, "\ud800 lone surrogate", 42], ids=["empty", "129", "surrogate", "int"]
)
def test_bad_labels_are_invalid_input(core: FewShotCore, label: object) -> None:
    with pytest.raises(InvalidInput, match="label"):
        core.add_examples("", label, shots(COLOURS["red"], 1, 0))  # type: ignore[arg-type]
    for call in (core.get_class, core.delete_class):
        with pytest.raises(InvalidInput, match="label"):
            call("", label)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="label"):
        core.delete_example("", label, "1")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="namespace"):
        core.list_classes("n" * 129)
    assert core.list_classes("") == []


@pytest.mark.parametrize("example_id", ["", "9" * 129], ids=["empty", "129"])
def test_bad_example_ids_are_invalid_input(core: FewShotCore, example_id: str) -> None:
    with pytest.raises(InvalidInput, match="example id"):
        core.delete_example("", "red", example_id)


def test_the_registry_owns_the_one_prepared_matrix(core: FewShotCore) -> None:
    core.add_examples("", "red", shots(COLOURS["red"], 2, 0))
    first = core.registry.prototypes("default", core.model_id)
    assert core._prototype_matrix("default") is first.classifier  # no second cache in the core
    assert not first.classifier.matrix.flags.writeable and not first.matrix.flags.writeable


def test_the_server_limits_numpys_blas_to_one_thread() -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    from fewshot_service.classify.prototypes import limit_blas_threads

    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas, "numpy's BLAS was not found"
    with threadpool_limits(limits=None):  # restores the original limits afterwards
        limit_blas_threads()
        assert {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"} == {1}


# -- the int8 copy of a large matrix: same answers as the float32 scan ----------------------------


def _float32_top_k(matrix: PrototypeMatrix, queries: np.ndarray, k: int) -> list[list[Prediction]]:
    queries = queries.astype(np.float32)
    return [matrix._best(row, k, query) for row, query in zip(matrix._scores(queries), queries)]


@pytest.fixture
def large_matrix() -> tuple[PrototypeMatrix, np.ndarray]:
    rng = np.random.default_rng(11)
    rows = l2_normalize(rng.standard_normal((INT8_SCAN_MIN_CLASSES + 500, 32))).astype(np.float32)
    labels = [f"c{i:06d}" for i in range(len(rows))]
    return PrototypeMatrix(labels, rows), rng


def test_the_int8_scan_answers_like_the_float32_scan(large_matrix) -> None:
    matrix, rng = large_matrix
    matrix.build_int8_scan()
    # Queries near a class (as real images are) and random ones.
    queries = np.concatenate(
        [
            l2_normalize(
                matrix.matrix[rng.integers(len(matrix), size=20)] + 0.3 * rng.standard_normal((20, 32))
            ),
            l2_normalize(rng.standard_normal((20, 32))),
        ]
    ).astype(np.float32)
    for k in (1, 5, 32):
        # The same classes with bit-identical scores: both paths rank by the exact score.
        assert matrix.top_k(queries, k) == _float32_top_k(matrix, queries, k)
    assert matrix.scan_stats.counts()["int8"] >= 100  # most answers came from the copy


def test_the_int8_scan_sees_patched_and_deleted_classes(large_matrix) -> None:
    matrix, rng = large_matrix
    matrix.build_int8_scan()
    target = l2_normalize(rng.standard_normal(32)).astype(np.float32)
    # After the copy: a new class right at the query, an old best class deleted, another moved.
    query = target[None, :]
    old_best = matrix.top_k(query, 2)
    patched = matrix.patched({"new-class": target, old_best[0][1].label: None, "c000001": -target})
    got = patched.top_k(query, 3)
    assert got == _float32_top_k(patched, query, 3)
    assert got[0][0].label == "new-class" and old_best[0][1].label not in [p.label for p in got[0]]
    assert "c000001" not in [p.label for p in patched.top_k(query, 32)[0]]


def test_the_int8_scan_falls_back_when_its_bound_cannot_decide(large_matrix) -> None:
    matrix, rng = large_matrix
    # Rows that differ by less than int8 can tell apart: the candidates cannot be trusted.
    base = l2_normalize(rng.standard_normal(32))
    rows = l2_normalize(base + 1e-4 * rng.standard_normal((INT8_SCAN_MIN_CLASSES + 10, 32))).astype(
        np.float32
    )
    close = PrototypeMatrix([f"r{i:06d}" for i in range(len(rows))], rows)
    close.build_int8_scan()
    query = base[None, :].astype(np.float32)
    assert close.top_k(query, 5) == _float32_top_k(close, query, 5)
    assert close.scan_stats.counts() == {"int8": 0, "float32_fallback": 1}


def test_scan_stats_are_the_matrixs_shared_by_its_versions_and_exact_across_threads(large_matrix) -> None:
    matrix, rng = large_matrix
    stats = ScanStats()
    rows = matrix.matrix
    own = PrototypeMatrix(matrix.labels, rows, stats)
    own.build_int8_scan()
    patched = own.patched({"c000001": None})  # in place: the same row store
    compacted = own.patched({label: None for label in own.labels[: len(own) // 2 + 100]})  # a new store
    queries = l2_normalize(rows[rng.integers(len(rows), size=8)] + 0.3 * rng.standard_normal((8, 32)))
    queries = queries.astype(np.float32)

    def classify(version: PrototypeMatrix) -> None:
        for _ in range(25):
            version.top_k(queries, 5)

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(classify, [own, patched, own, patched, own, patched]))
    counted = stats.counts()
    assert counted["int8"] + counted["float32_fallback"] == 6 * 25 * len(queries)  # none lost
    assert patched.scan_stats is stats and compacted.scan_stats is stats
    assert matrix.scan_stats is not stats and matrix.scan_stats.counts() == {"int8": 0, "float32_fallback": 0}


def test_the_int8_copy_is_built_in_the_background_for_a_large_matrix(large_matrix) -> None:
    matrix, rng = large_matrix
    query = l2_normalize(rng.standard_normal((1, 32))).astype(np.float32)
    assert matrix.top_k(query, 5) == _float32_top_k(matrix, query, 5)  # float32 until it exists
    deadline = time.monotonic() + 30
    while matrix._store.int8 is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert matrix._store.int8 is not None and matrix._store.int8.rows == len(matrix)
    small = PrototypeMatrix(["a", "b"], np.eye(2, dtype=np.float32))
    small.top_k(np.eye(2, dtype=np.float32), 1)
    assert small._store.int8 is None and not small._store.int8_building  # not worth it: never built


# -- one rule for ties on every path and every CPU ---------------------------------------------------


def test_exact_scores_are_the_correctly_rounded_dot_products() -> None:
    import math

    rng = np.random.default_rng(21)
    for dim in (1, 3, 32, 100, 384):
        rows = unit(rng.normal(size=(50, dim)))
        query = unit(rng.normal(size=(1, dim)))[0]
        expected = [np.float32(math.fsum(float(a) * float(b) for a, b in zip(row, query))) for row in rows]
        assert exact_scores(rows, query).tolist() == [float(x) for x in expected]
        # And within the stated bound of what any BLAS kernel computes.
        assert np.abs(rows @ query - exact_scores(rows, query)).max() <= blas_error_bound(dim, 1.0)


def _tied_matrix(
    rng: np.random.Generator, classes: int, dim: int = 32
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rows with exact duplicates of the query's direction, rows one float32 step away from it,
    and random rows; labels in an order unrelated to the rows."""
    query = l2_normalize(rng.standard_normal(dim)).astype(np.float32)
    rows = l2_normalize(rng.standard_normal((classes, dim))).astype(np.float32)
    duplicates = rng.choice(classes, size=281, replace=False)
    rows[duplicates] = query
    near = rng.choice(np.setdiff1d(np.arange(classes), duplicates), size=64, replace=False)
    rows[near] = np.nextafter(query, np.float32(2.0))  # each coordinate one ulp away
    rows[near[::2], 0] = np.nextafter(query[0], np.float32(-2.0))
    labels = [f"x{int(i):06d}" for i in rng.permutation(classes)]
    return labels, rows, query[None, :]


@pytest.mark.parametrize("classes", [600, INT8_SCAN_MIN_CLASSES + 300])
def test_duplicate_and_near_duplicate_rows_rank_the_same_on_every_path(classes: int) -> None:
    rng = np.random.default_rng(classes)
    labels, rows, query = _tied_matrix(rng, classes)
    matrix = PrototypeMatrix(labels, rows)
    matrix.build_int8_scan()
    order = rng.permutation(classes)
    reordered = PrototypeMatrix([labels[i] for i in order], rows[order])  # other slots, same classes
    # A patched version whose tied rows were appended after the int8 copy.
    moved = {labels[i]: rows[i] for i in range(0, classes, 7)}
    patched = PrototypeMatrix(
        [label for label in labels if label not in moved],
        np.stack([r for label, r in zip(labels, rows) if label not in moved]),
    )
    patched.build_int8_scan()
    patched = patched.patched(moved)
    for k in (1, 5, 300, 400):
        expected = _float32_top_k(matrix, query, k)
        for other in (matrix.top_k(query, k), reordered.top_k(query, k), patched.top_k(query, k)):
            assert other == expected  # same labels, bit-identical scores
        best = expected[0]
        # Ordered by the exact score, then by label.
        assert [(-p.score, p.label) for p in best] == sorted((-p.score, p.label) for p in best)
        exact = exact_scores(matrix.matrix, query[0])
        ranked = sorted(zip((-exact).tolist(), matrix.labels))[:k]
        assert [(p.label, p.score) for p in best] == [(label, -score) for score, label in ranked]


_KERNEL_PROBE = """
import json, sys
import numpy as np
from fewshot_service.classify.prototypes import INT8_SCAN_MIN_CLASSES, PrototypeMatrix
from threadpoolctl import threadpool_info
sys.path.insert(0, sys.argv[1])
from test_classifier import _float32_top_k, _tied_matrix
out = {"blas": [p.get("architecture") for p in threadpool_info() if p["user_api"] == "blas"]}
for classes in (600, INT8_SCAN_MIN_CLASSES + 300):
    rng = np.random.default_rng(classes)
    labels, rows, query = _tied_matrix(rng, classes)
    queries = np.concatenate([query, np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    matrix = PrototypeMatrix(labels, rows)
    matrix.build_int8_scan()
    for k in (1, 5, 300):
        for name, answer in (("scan", _float32_top_k(matrix, queries, k)), ("top_k", matrix.top_k(queries, k))):
            out[f"{classes}/{k}/{name}"] = [[(p.label, p.score.hex()) for p in preds] for preds in answer]
print(json.dumps(out))
"""


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":")[1].split()
    }


@pytest.mark.slow
def test_answers_are_the_same_under_every_blas_kernel_this_cpu_can_run() -> None:
    """What another CPU family computes, seen here: OpenBLAS's kernel for each family this CPU can
    run (OPENBLAS_CORETYPE), with numpy's own SIMD dispatch held to AVX2 for the AVX2 ones."""
    import json
    import os
    import subprocess
    import sys

    flags = _cpu_flags()
    kernels = [
        ("Prescott", set()),
        ("Nehalem", {"sse4_2"}),
        ("Sandybridge", {"avx"}),
        ("Haswell", {"avx2", "fma"}),
        ("SkylakeX", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    ]
    runnable = [name for name, needs in kernels if needs <= flags]
    assert "Haswell" in runnable or "avx2" not in flags
    numpy_features = [
        f for f in ("X86_V4", "AVX512_ICL", "AVX512_SPR") if f.lower() in flags or f == "X86_V4"
    ]
    answers = {}
    for kernel in runnable:
        env = {**os.environ, "OPENBLAS_CORETYPE": kernel}
        if kernel != "SkylakeX" and "avx512f" in flags:
            env["NPY_DISABLE_CPU_FEATURES"] = " ".join(numpy_features)
        tests_dir = str(Path(__file__).parent)
        done = subprocess.run(
            [sys.executable, "-c", _KERNEL_PROBE, tests_dir],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        answers[kernel] = json.loads(done.stdout.splitlines()[-1])
    kernels_seen = {kernel: answer.pop("blas") for kernel, answer in answers.items()}
    assert len(set(map(str, kernels_seen.values()))) == len(runnable), kernels_seen  # really other kernels
    first = answers[runnable[0]]
    for kernel in runnable[1:]:
        assert answers[kernel] == first, f"{kernel} ranks differently from {runnable[0]}"
