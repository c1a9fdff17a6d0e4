"""The namespace report (issue 33): leave-one-out accuracy per class, confused pairs, classes that
need more or cleaner shots, expected accuracy -- the math against a brute-force rebuild, then
GET /v1/report and client.report over a real server stack (real Redis, real ONNX model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from fewshot_client import FewShotClient
from fewshot_common.vectors import l2_normalize
from fewshot_service.app import ServerStack
from fewshot_service.classify.prototypes import PrototypeMatrix
from fewshot_service.classify.report import judge_namespace
from fewshot_service.classify.snapshot import ExampleSnapshot
from fewshot_service.core import reports
from fewshot_service.registry.redis_server import ManagedRedis

import image_samples as samples
from conftest import stack_settings

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 30, 220), "yellow": (230, 220, 30)}


def snapshot_of(classes: list[np.ndarray]) -> ExampleSnapshot:
    labels = [f"c{i}" for i in range(len(classes))]
    return ExampleSnapshot(
        labels=labels,
        means=np.stack([c.mean(axis=0) for c in classes]).astype(np.float32),
        counts=np.array([len(c) for c in classes]),
        example_ids=[[f"{label}-{j}" for j in range(len(c))] for label, c in zip(labels, classes)],
        embeddings=[c.astype(np.float32) for c in classes],
        epoch="e",
        generation=1,
    )


def test_the_report_matches_a_brute_force_leave_one_out() -> None:
    rng = np.random.default_rng(0)
    centres = l2_normalize(rng.standard_normal((5, 16)))
    centres[1] = l2_normalize(centres[0] + 0.3 * centres[1])  # c0 and c1 overlap
    sizes = [6, 6, 5, 3, 1]
    classes = [l2_normalize(centres[c] + 0.6 * rng.standard_normal((n, 16)) / 4) for c, n in enumerate(sizes)]
    snapshot = snapshot_of(classes)
    matrix = PrototypeMatrix(snapshot.labels, snapshot.means)
    report = judge_namespace(matrix, snapshot, total_examples=sum(sizes))

    # Brute force: rebuild the example's class without it, classify among all prototypes.
    right: dict[str, list[bool]] = {}
    confusions: dict[tuple[str, str], int] = {}
    for c, vectors in enumerate(classes):
        if len(vectors) < 2:
            continue
        for i, vector in enumerate(vectors):
            means = snapshot.means.astype(np.float64).copy()
            means[c] = np.delete(vectors, i, axis=0).mean(axis=0)
            predicted = int(np.argmax(l2_normalize(means) @ vector))
            right.setdefault(f"c{c}", []).append(predicted == c)
            if predicted != c:
                confusions[(f"c{c}", f"c{predicted}")] = confusions.get((f"c{c}", f"c{predicted}"), 0) + 1
    judged = {j.label: j for j in report.per_class}
    assert set(judged) == {f"c{i}" for i in range(5)}
    for label, answers in right.items():
        assert judged[label].loo_accuracy == pytest.approx(np.mean(answers))
        assert len(judged[label].suspect_example_ids) == answers.count(False)
    assert judged["c4"].loo_accuracy is None and judged["c4"].suspect_example_ids == []
    all_answers = [a for answers in right.values() for a in answers]
    assert report.expected_accuracy == pytest.approx(np.mean(all_answers))
    assert report.judged_examples == len(all_answers) == sum(sizes) - 1
    assert (report.classes, report.examples) == (5, sum(sizes))
    # Worst first; classes of fewer than RECOMMENDED_SHOTS need more.
    accuracies = [j.loo_accuracy for j in report.per_class if j.loo_accuracy is not None]
    assert accuracies == sorted(accuracies)
    assert "more_shots" in judged["c3"].needs and "more_shots" in judged["c4"].needs
    # Every LOO confusion is counted, both ways, with the prototypes' cosine.
    for pair in report.confused_pairs:
        assert pair.a < pair.b
        assert pair.a_as_b == confusions.get((pair.a, pair.b), 0)
        assert pair.b_as_a == confusions.get((pair.b, pair.a), 0)
        rows = l2_normalize(snapshot.means.astype(np.float64))
        assert pair.similarity == pytest.approx(rows[int(pair.a[1:])] @ rows[int(pair.b[1:])], abs=1e-5)
    assert sum(p.a_as_b + p.b_as_a for p in report.confused_pairs) == sum(confusions.values())
    nearest = (
        l2_normalize(snapshot.means.astype(np.float64)) @ l2_normalize(snapshot.means.astype(np.float64)).T
    )
    np.fill_diagonal(nearest, -2)
    assert judged["c0"].nearest_label == f"c{int(np.argmax(nearest[0]))}"


def test_a_one_class_one_example_namespace_has_a_report_without_judgements() -> None:
    vector = l2_normalize(np.random.default_rng(1).standard_normal((1, 8)))
    snapshot = snapshot_of([vector])
    report = judge_namespace(PrototypeMatrix(snapshot.labels, snapshot.means), snapshot, 1)
    assert report.expected_accuracy is None and report.judged_examples == 0
    (only,) = report.per_class
    assert (only.loo_accuracy, only.nearest_label, only.needs) == (None, None, ["more_shots"])
    assert report.confused_pairs == []


# -- over a real server ------------------------------------------------------------------------------


def shots(rgb: tuple[int, int, int], n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [
        samples.solid_png(tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in rgb))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def stack(private_redis: ManagedRedis, tiny_model_path: Path) -> Iterator[ServerStack]:
    settings = stack_settings(tiny_model_path, private_redis.url, redis_key_prefix="report-test")
    with ServerStack(settings) as running:
        yield running


@pytest.fixture
def http(stack: ServerStack, redis_url: str) -> Iterator[httpx.Client]:
    # redis_url empties the private server before each test.
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=60) as client:
        yield client


def add(http: httpx.Client, label: str, images: list[bytes], namespace: str = "shop") -> dict:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = http.post(
        f"/v1/classes/{quote(label, safe='')}/examples", params={"namespace": namespace}, files=files
    )
    assert response.status_code == 201, response.text
    return response.json()


def test_the_report_names_the_mislabelled_shot_the_thin_class_and_the_confused_pair(
    http: httpx.Client, stack: ServerStack
) -> None:
    for seed, label in enumerate(("red", "blue", "yellow")):
        add(http, label, shots(COLOURS[label], 5, seed))
    # green: 5 clean shots and one red one (planted), added last.
    add(http, "green", shots(COLOURS["green"], 5, 7))
    planted = add(http, "green", shots(COLOURS["red"], 1, 8))["added_example_ids"][0]
    add(http, "thin", shots((0, 0, 0), 2, 9))

    response = http.get("/v1/report", params={"namespace": "shop"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["namespace"] == "shop" and body["model_id"] == stack.core.model_id
    assert (body["classes"], body["examples"], body["sampled"]) == (5, 23, False)
    assert body["judged_examples"] == 23
    classes = {c["label"]: c for c in body["per_class"]}
    assert set(classes) == {"red", "blue", "yellow", "green", "thin"}
    green = classes["green"]
    assert green["suspect_example_ids"] == [planted]
    assert green["loo_accuracy"] == pytest.approx(5 / 6)
    assert green["needs"] == ["cleaner_shots"]
    assert classes["thin"]["needs"][0] == "more_shots" and classes["thin"]["count"] == 2
    assert classes["red"]["loo_accuracy"] == 1.0 and classes["red"]["needs"] == []
    pair = body["confused_pairs"][0]  # the one confusion ranks first
    assert (pair["a"], pair["b"], pair["a_as_b"], pair["b_as_a"]) == ("green", "red", 1, 0)
    assert -1.0 <= pair["similarity"] <= 1.0
    assert body["expected_accuracy"] == pytest.approx(22 / 23)
    assert body["per_class"][0]["label"] == "green"  # worst first

    # The client reads the same answer.
    with FewShotClient(http_url=f"http://127.0.0.1:{stack.http_port}") as client:
        report = client.report(namespace="shop")
    assert report.expected_accuracy == pytest.approx(body["expected_accuracy"])
    assert [c.label for c in report.per_class] == [c["label"] for c in body["per_class"]]
    assert report.confused_pairs[0].a_as_b == 1 and report.per_class[0].suspect_example_ids == [planted]


def test_an_empty_or_bad_namespace_is_a_clear_4xx(http: httpx.Client) -> None:
    empty = http.get("/v1/report", params={"namespace": "nothing-here"})
    assert empty.status_code == 409, empty.text
    assert empty.json()["error"] and "redis" not in empty.text.lower()
    bad = http.get("/v1/report", params={"namespace": "x" * 500})
    assert bad.status_code == 422, bad.text
    not_utf8 = http.get("/v1/report?namespace=bad%FF")
    assert not_utf8.status_code == 422 and not_utf8.json()["error"] == "invalid_input", not_utf8.text


def test_a_large_namespace_is_judged_from_a_bounded_sample_and_cached_per_state(
    http: httpx.Client, stack: ServerStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for seed, (label, rgb) in enumerate(COLOURS.items()):
        add(http, label, shots(rgb, 6, seed), namespace="big")
    monkeypatch.setattr(reports, "MAX_JUDGED_CLASSES", 2)
    monkeypatch.setattr(reports, "MAX_JUDGED_EXAMPLES", 6)  # 3 per judged class
    body = http.get("/v1/report", params={"namespace": "big"}).json()
    assert body["sampled"] is True
    assert (body["classes"], body["examples"]) == (4, 24)
    assert len(body["per_class"]) == 2 and body["judged_examples"] == 6
    assert all(c["count"] == 6 for c in body["per_class"])  # counts are the classes' own
    # The same state answers from the cache; a change answers anew.
    assert stack.core is not None
    first = stack.core.report("big")
    assert stack.core.report("big") is first
    add(http, "red", shots(COLOURS["red"], 1, 20), namespace="big")
    assert stack.core.report("big") is not first
    assert stack.core.report("big").examples == 25
