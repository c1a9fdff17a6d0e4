"""Issue 17 parts 2 and 3 over a real server stack (real Redis, real ONNX model, loopback REST and
gRPC): the calibrated ``unknown`` flag and ``confidence`` of Classify, shot warnings on upload,
per-example consistency and confusions of a class."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import pytest

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc
from fewshot_common.errors import InvalidInput
from fewshot_common.image_files import list_labelled_image_files
from fewshot_common.vectors import l2_normalize
from fewshot_service.app import ServerStack
from fewshot_service.classify.open_set import (
    leave_one_out_scores,
    resolve_unknown_rate,
)
from fewshot_service.registry.redis_server import ManagedRedis

import image_samples as samples
from conftest import stack_settings

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 30, 220), "yellow": (230, 220, 30)}
# The tiny random test model maps two jittered shots of one colour to cosine up to ~0.9996, so its
# duplicate threshold sits above that; the same bytes embed to 1.0.
TEST_DUPLICATE_SIMILARITY = 0.99999


def shots(rgb: tuple[int, int, int], n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [
        samples.solid_png(tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in rgb))
        for _ in range(n)
    ]


def uploads(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


@pytest.fixture(scope="module")
def stack(private_redis: ManagedRedis, tiny_model_path: Path) -> Iterator[ServerStack]:
    settings = stack_settings(
        tiny_model_path,
        private_redis.url,
        redis_key_prefix="open-set-test",
        duplicate_similarity=TEST_DUPLICATE_SIMILARITY,
    )
    with ServerStack(settings) as running:
        yield running


@pytest.fixture
def http(stack: ServerStack, redis_url: str) -> Iterator[httpx.Client]:
    # redis_url empties the private server before each test.
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=60) as client:
        yield client


def add(http: httpx.Client, label: str, images: list[bytes], namespace: str = "shop") -> dict:
    response = http.post(
        f"/v1/classes/{quote(label, safe='')}/examples",
        params={"namespace": namespace},
        files=uploads(images),
    )
    assert response.status_code == 201, response.text
    return response.json()


def add_colour_classes(http: httpx.Client, per_class: int = 4) -> None:
    for seed, (label, rgb) in enumerate(COLOURS.items()):
        body = add(http, label, shots(rgb, per_class, seed))
        assert body["warnings"] == [], body  # clean shots of distinct colours warn of nothing


# -- the calculation itself ------------------------------------------------------------------------


def test_leave_one_out_scores_match_a_prototype_rebuilt_without_the_example() -> None:
    rng = np.random.default_rng(0)
    examples = [l2_normalize(rng.normal(size=(n, 8))) for n in (3, 1, 4)]
    means = np.stack([e.mean(axis=0) for e in examples])
    loo = leave_one_out_scores(means, np.array([3, 1, 4]), examples)
    assert list(loo.own) == [0, 0, 0, 2, 2, 2, 2]  # the one-example class has no LOO score
    for row, (c, i) in enumerate([(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 2), (2, 3)]):
        rest = np.delete(examples[c], i, axis=0).mean(axis=0)
        assert loo.scores[row, c] == pytest.approx(examples[c][i] @ l2_normalize(rest))
        other = 1 if c != 1 else 0
        assert loo.scores[row, other] == pytest.approx(examples[c][i] @ l2_normalize(means[other]))


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_unknown_rate_outside_0_1_is_refused(rate: float) -> None:
    with pytest.raises(InvalidInput, match="unknown_rate"):
        resolve_unknown_rate(rate)


def test_unknown_rate_0_means_the_default() -> None:
    assert resolve_unknown_rate(0, default=0.2) == 0.2
    assert resolve_unknown_rate(0.3, default=0.2) == 0.3


# -- unknown and confidence over both transports ---------------------------------------------------


def test_noise_is_unknown_and_held_out_colours_are_not(http: httpx.Client, stack: ServerStack) -> None:
    add_colour_classes(http)
    noise = [samples.noise_png(seed) for seed in range(4)]
    colours = [shots(rgb, 1, 100 + i)[0] for i, rgb in enumerate(COLOURS.values())]
    response = http.post(
        "/v1/classify",
        params={"namespace": "shop", "top_k": 2, "unknown_rate": 0.05},
        files=uploads(noise + colours),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["unknown"] == [True] * 4 + [False] * 4, body
    assert body["unknown_rate"] == 0.05
    assert [r[0]["label"] for r in body["results"][4:]] == list(COLOURS)
    for result, p_unknown in zip(body["results"], body["unknown_probability"], strict=True):
        top, second = result
        assert 0.0 <= second["confidence"] <= top["confidence"] <= 1.0
        # One distribution: the top 2 and unknown sum to at most 1; unknown flagged where it leads.
        assert top["confidence"] + second["confidence"] + p_unknown <= 1.0 + 1e-6
    assert [p > r[0]["confidence"] for p, r in zip(body["unknown_probability"], body["results"])] == body[
        "unknown"
    ]
    # A held-out shot of a registered colour: its class far ahead of the next; noise: mostly
    # unknown, no class likely. (The tiny test model's shots of a colour all score ~0.997, so the
    # fitted distribution stays soft between a colour and the threshold just below it.)
    colour_results, noise_results = body["results"][4:], body["results"][:4]
    assert all(r[0]["confidence"] > 10 * r[1]["confidence"] for r in colour_results)
    assert min(r[0]["confidence"] for r in colour_results) > max(r[0]["confidence"] for r in noise_results)
    assert min(body["unknown_probability"][:4]) > 0.5 > max(body["unknown_probability"][4:])
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        reply = fewshot_pb2_grpc.FewShotStub(channel).Classify(
            fewshot_pb2.ClassifyRequest(images=noise + colours, namespace="shop", top_k=2), timeout=60
        )
    assert [r.unknown for r in reply.results] == body["unknown"]
    assert [r.unknown_probability for r in reply.results] == pytest.approx(
        body["unknown_probability"], abs=1e-5
    )
    for mine, theirs in zip(reply.results, body["results"]):
        assert [p.confidence for p in mine.predictions] == pytest.approx(
            [p["confidence"] for p in theirs], abs=1e-5
        )


def test_a_higher_unknown_rate_flags_at_least_as_many(http: httpx.Client) -> None:
    add_colour_classes(http)
    queries = [img for i, rgb in enumerate(COLOURS.values()) for img in shots(rgb, 4, 200 + i)]
    flagged = []
    for rate in (0.01, 0.5, 0.99):
        body = http.post(
            "/v1/classify", params={"namespace": "shop", "unknown_rate": rate}, files=uploads(queries[:16])
        ).json()
        flagged.append(sum(body["unknown"]))
    assert flagged[0] <= flagged[1] <= flagged[2] and flagged[0] < flagged[2], flagged


# -- shot quality ----------------------------------------------------------------------------------


def test_a_planted_mislabeled_shot_is_flagged_and_shown_in_the_class(http: httpx.Client) -> None:
    add_colour_classes(http, per_class=3)
    body = add(http, "red", [shots(COLOURS["red"], 1, 50)[0], shots(COLOURS["blue"], 1, 51)[0]])
    good, planted = body["added_example_ids"]
    assert [(w["example_id"], w["kind"], w["other"]) for w in body["warnings"]] == [
        (planted, "likely_mislabel", "blue")
    ], body
    assert "closer to class 'blue'" in body["warnings"][0]["message"]

    detail = http.get("/v1/classes/red", params={"namespace": "shop"}).json()
    assert [e["example_id"] for e in detail["examples"]] == detail["example_ids"]
    by_id = {e["example_id"]: e for e in detail["examples"]}
    assert by_id[planted]["likely_mislabel"] and by_id[planted]["nearest_other_label"] == "blue"
    assert not by_id[good]["likely_mislabel"]
    assert by_id[planted]["consistency"] < by_id[good]["consistency"]
    assert sum(e["likely_mislabel"] for e in detail["examples"]) == 1

    confusions = http.get("/v1/classes/red/confusions", params={"namespace": "shop", "top_k": 2}).json()
    found = confusions["confusions"]
    assert len(found) == 2 and "red" not in [c["label"] for c in found]
    assert found[0]["prototype_similarity"] >= found[1]["prototype_similarity"]
    everything = http.get("/v1/classes/red/confusions", params={"namespace": "shop"}).json()["confusions"]
    assert {c["label"]: c["examples_closer"] for c in everything}["blue"] == 1


def test_a_duplicate_image_is_flagged_but_a_new_one_is_not(http: httpx.Client) -> None:
    first, fresh = samples.solid_png((230, 20, 20)), samples.solid_png((200, 60, 40))
    add(http, "red", [first, samples.solid_png((240, 10, 30))])
    add(http, "blue", shots(COLOURS["blue"], 2, 3))
    body = add(http, "red", [first, fresh, fresh])
    again, new, twice = body["added_example_ids"]
    duplicates = [(w["example_id"], w["other"]) for w in body["warnings"] if w["kind"] == "near_duplicate"]
    # The re-sent image duplicates the stored one; the new image only its copy later in the request.
    assert duplicates == [(again, "1"), (twice, new)], body
    assert all(
        w["similarity"] >= TEST_DUPLICATE_SIMILARITY
        for w in body["warnings"]
        if w["kind"] == "near_duplicate"
    )


def test_a_bulk_add_warns_as_each_class_stands_after_it(http: httpx.Client) -> None:
    """A bulk request's warnings judge each class as the request left it (its stored examples
    too), against the request's other classes: the same warnings as a single add of them."""

    def bulk(items: list[tuple[str, bytes]]) -> dict[str, dict]:
        response = http.post(
            "/v1/examples:bulk",
            params={"namespace": "shop"},
            data={"labels": [label for label, _ in items]},
            files=uploads([data for _, data in items]),
        )
        assert response.status_code == 200, response.text
        return {c["label"]: c for c in response.json()["classes"]}

    reds = [(230, 20, 20), (240, 10, 30), (220, 30, 15)]
    first = bulk(
        [("red", samples.solid_png(rgb)) for rgb in reds]
        + [("blue", b) for b in shots(COLOURS["blue"], 3, 3)]
    )
    assert [first[label]["count"] for label in ("red", "blue")] == [3, 3]
    # One upload per class here, but each class holds more: the first red's pixels again in other
    # bytes (a larger canvas of its colour) nearly duplicate the stored red, and a red shot
    # planted in blue is closer to red than to blue without it.
    twin = samples.solid_png(reds[0], size=(64, 40))
    planted = shots(COLOURS["red"], 1, 51)[0]
    second = bulk([("red", twin), ("blue", planted), ("green", shots(COLOURS["green"], 1, 4)[0])])
    [twin_id], [planted_id] = second["red"]["added_example_ids"], second["blue"]["added_example_ids"]
    assert [(w["example_id"], w["kind"], w["other"]) for w in second["red"]["warnings"]] == [
        (twin_id, "near_duplicate", first["red"]["added_example_ids"][0])
    ], second["red"]
    assert [(w["example_id"], w["kind"], w["other"]) for w in second["blue"]["warnings"]] == [
        (planted_id, "likely_mislabel", "red")
    ], second["blue"]
    assert second["green"]["warnings"] == []  # one example: nothing to compare it with


def test_one_example_classes_have_no_consistency(http: httpx.Client) -> None:
    add(http, "red", shots(COLOURS["red"], 1, 0))
    detail = http.get("/v1/classes/red", params={"namespace": "shop"}).json()
    assert detail["examples"] == [
        {
            "example_id": detail["example_ids"][0],
            "consistency": None,
            "nearest_other_label": None,
            "nearest_other_score": None,
            "likely_mislabel": False,
            "near_duplicate_of": None,
        }
    ]


def test_confusions_of_an_unknown_class_is_404(http: httpx.Client) -> None:
    add(http, "red", shots(COLOURS["red"], 1, 0))
    response = http.get("/v1/classes/nope/confusions", params={"namespace": "shop"})
    assert response.status_code == 404 and response.json()["error"] == "not_found", response.text


# -- calibration on real images with the shipped model ---------------------------------------------

DEV_SHOTS, DEV_QUERIES, DEV_RATE = 5, 10, 0.1
# 500 queries (binomial sd 0.013 at 0.1) and a quantile of 250 LOO scores (sd ~0.02): 0.05 is
# about two standard deviations of the two together.
DEV_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def shipped_stack(private_redis: ManagedRedis) -> Iterator[ServerStack]:
    settings = stack_settings(
        REPO / "models" / "default.onnx", private_redis.url, redis_key_prefix="open-set-dev-test"
    )
    with ServerStack(settings) as running:
        yield running


@pytest.mark.slow
def test_unknown_rate_is_calibrated_on_the_dev_split(
    shared_data: Path, shipped_stack: ServerStack, redis_url: str
) -> None:
    files = list_labelled_image_files(shared_data / "fewshot-dev")
    flagged = 0
    with httpx.Client(base_url=f"http://127.0.0.1:{shipped_stack.http_port}", timeout=120) as http:
        queries: list[bytes] = []
        for c, name in enumerate(files.classes):
            paths = [p for p, label in zip(files.paths, files.labels) if label == c]
            add(http, name, [p.read_bytes() for p in paths[:DEV_SHOTS]], namespace="dev")
            queries += [p.read_bytes() for p in paths[DEV_SHOTS : DEV_SHOTS + DEV_QUERIES]]
        for start in range(0, len(queries), 50):
            response = http.post(
                "/v1/classify",
                params={"namespace": "dev", "unknown_rate": DEV_RATE},
                files=uploads(queries[start : start + 50]),
            )
            assert response.status_code == 200, response.text
            flagged += sum(response.json()["unknown"])
    assert abs(flagged / len(queries) - DEV_RATE) <= DEV_TOLERANCE, flagged / len(queries)


# -- cost at scale: one scan per Classify, calibration off the request path -----------------------


def test_label_images_takes_the_runner_up_from_its_one_scan() -> None:
    from fewshot_service.classify.open_set import Calibration, label_images, log_sum_exp, top_two
    from fewshot_service.classify.prototypes import PrototypeMatrix

    rng = np.random.default_rng(3)
    matrix = PrototypeMatrix([f"c{i:03d}" for i in range(300)], l2_normalize(rng.standard_normal((300, 16))))
    queries = l2_normalize(rng.standard_normal((7, 16))).astype(np.float32)
    top1, top2 = top_two(queries @ matrix.matrix.T)  # the full matmul the one scan replaced
    calibration = Calibration(np.sort(np.concatenate([top1, top1 + 1e-3])), inverse_temperature=10.0)
    results = label_images(matrix, calibration, queries, 1, 0.3)
    expected_unknown = calibration.unknown(top1, top2, 0.3)
    # The softmax over every class (the full matmul) and unknown, at the rate's threshold.
    everything = (queries @ matrix.matrix.T).astype(np.float64) * 10.0
    log_partition = np.logaddexp(log_sum_exp(everything), calibration.threshold(0.3) * 10.0)
    for i, (result, best, unknown) in enumerate(zip(results, top1, expected_unknown)):
        assert len(result.predictions) == 1
        assert result.predictions[0].score == pytest.approx(best, abs=1e-6)
        assert result.predictions[0].confidence == pytest.approx(
            np.exp(best * 10.0 - log_partition[i]), abs=1e-5
        )
        assert result.unknown_probability == pytest.approx(
            np.exp(calibration.threshold(0.3) * 10.0 - log_partition[i]), abs=1e-5
        )
        assert result.unknown == unknown
    assert 0 < sum(r.unknown for r in results) < len(results)  # the threshold splits this batch


def test_sampled_labels_are_stable_and_bounded() -> None:
    from fewshot_service.classify.open_set import sampled_labels

    labels = [f"class-{i}" for i in range(1000)]
    sample = sampled_labels(labels, 50)
    assert len(sample) == 50 and sample == sorted(sample) and set(sample) <= set(labels)
    assert sampled_labels(list(reversed(labels)) + ["new"], 50) == sample or "new" in sampled_labels(
        labels + ["new"], 50
    )  # adding a class keeps the sample except where the newcomer hashes in
    assert sampled_labels(labels[:10], 50) == labels[:10]


def test_a_large_namespace_is_calibrated_in_the_background_from_a_sample(redis_url: str) -> None:
    import redis as redis_py

    from fewshot_service.core import calibrator as calibrator_module
    from fewshot_service.registry.registry import Registry

    registry = Registry(redis_py.Redis.from_url(redis_url), key_prefix="calibrate-scale")
    rng = np.random.default_rng(5)
    classes = calibrator_module.SYNC_CALIBRATION_CLASSES + 40
    registry.add_classes(
        "big", {f"c{i:04d}": l2_normalize(rng.standard_normal((3, 8))) for i in range(classes)}, "m"
    )
    calibrator = calibrator_module.OpenSetCalibrator(registry)
    fetched: list[int] = []
    real_snapshot = registry.example_snapshot

    def counting_snapshot(*args, **kwargs):  # records how many classes each calibration read
        snapshot = real_snapshot(*args, **kwargs)
        fetched.append(sum(len(ids) > 0 for ids in snapshot.example_ids))
        return snapshot

    registry.example_snapshot = counting_snapshot  # type: ignore[method-assign]
    try:
        state = registry.prototypes("big", "m")
        first = calibrator.calibration("big", state)
        assert not first.calibrated  # the request did not wait: global defaults meanwhile
        assert calibrator.wait_idle()
        second = calibrator.calibration("big", state)
        assert second.calibrated and len(second.sorted_statistics) == calibrator_module.SAMPLED_CLASSES * 3
        assert fetched == [calibrator_module.SAMPLED_CLASSES]  # a sample of classes, fetched once
        # A change: the stale calibration answers at once; the refresh waits for its interval.
        registry.add_examples("big", "c0000", l2_normalize(rng.standard_normal((1, 8))), "m")
        newer = registry.prototypes("big", "m")
        assert calibrator.calibration("big", newer) is second
        assert calibrator.wait_idle() and fetched == [calibrator_module.SAMPLED_CLASSES]
    finally:
        calibrator.close()
        registry.delete_namespace("big")


def test_a_small_namespace_is_recalibrated_on_the_request_that_sees_the_change(redis_url: str) -> None:
    import redis as redis_py

    from fewshot_service.core.calibrator import OpenSetCalibrator
    from fewshot_service.registry.registry import Registry

    registry = Registry(redis_py.Redis.from_url(redis_url), key_prefix="calibrate-small")
    rng = np.random.default_rng(6)
    registry.add_classes("small", {f"c{i}": l2_normalize(rng.standard_normal((4, 8))) for i in range(5)}, "m")
    calibrator = OpenSetCalibrator(registry)
    try:
        before = calibrator.calibration("small", registry.prototypes("small", "m"))
        assert len(before.sorted_statistics) == 20
        registry.add_examples("small", "c0", l2_normalize(rng.standard_normal((2, 8))), "m")
        after = calibrator.calibration("small", registry.prototypes("small", "m"))
        assert len(after.sorted_statistics) == 22  # this state's examples, no waiting
    finally:
        calibrator.close()
        registry.delete_namespace("small")


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.37, 0.5, 0.99])
def test_the_threshold_is_numpys_quantile(rate: float) -> None:
    from fewshot_service.classify.open_set import Calibration

    statistics = np.sort(np.random.default_rng(2).normal(0.4, 0.1, 57))
    assert Calibration(statistics).threshold(rate) == pytest.approx(
        float(np.quantile(statistics, rate)), abs=1e-12
    )


def test_a_warning_sees_a_class_another_replica_added_just_before(
    stack: ServerStack, http: httpx.Client, private_redis: ManagedRedis, tiny_model_path: Path
) -> None:
    """The other classes come from this replica's matrix (issue 31): it syncs on the add itself,
    so a class another replica wrote before is in it, though this replica never saw it."""
    settings = stack_settings(
        tiny_model_path,
        private_redis.url,
        redis_key_prefix="open-set-test",
        duplicate_similarity=TEST_DUPLICATE_SIMILARITY,
    )
    for label in ("red", "green"):
        add(http, label, shots(COLOURS[label], 3, 1))
    assert http.get("/v1/classes/red", params={"namespace": "shop"}).status_code == 200  # matrix cached here
    with (
        ServerStack(settings) as other,
        httpx.Client(base_url=f"http://127.0.0.1:{other.http_port}", timeout=60) as second,
    ):
        assert add(second, "blue", shots(COLOURS["blue"], 3, 2))["warnings"] == []
    body = add(http, "red", [shots(COLOURS["blue"], 1, 3)[0]])
    assert [(w["kind"], w["other"]) for w in body["warnings"]] == [("likely_mislabel", "blue")], body
    detail = http.get("/v1/classes/red", params={"namespace": "shop"}).json()
    assert detail["examples"][-1]["nearest_other_label"] == "blue"
    confusions = http.get("/v1/classes/red/confusions", params={"namespace": "shop"}).json()["confusions"]
    assert {c["label"] for c in confusions} == {"green", "blue"}
