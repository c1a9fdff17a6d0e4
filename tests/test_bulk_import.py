"""Bulk add (POST /v1/examples:bulk), client.add_examples_bulk and ``fewshot import DIR`` against a
real server stack (REST on loopback, a private Redis, the real exported model), and on the Redis
Cluster: classes land, re-sent bytes are skipped, bad input is refused whole with a JSON body."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fewshot_client import FewShotClient
from fewshot_common.cli import main as fewshot_main
from fewshot_service.app import ServerStack

import image_samples as samples
from conftest import stack_settings

# Small limits, so one test request crosses them: 4 images per request (a bulk request decodes 4
# per job, several jobs) in batches of 4, at most 40 uploads per bulk request, 6 examples per class.
LIMITS = {"max_images": 4, "max_batch_size": 4, "max_bulk_images": 40, "max_examples_per_class": 6}


@pytest.fixture(scope="module")
def stack(private_redis, tiny_model_path: Path) -> Iterator[ServerStack]:
    settings = stack_settings(tiny_model_path, private_redis.url, redis_key_prefix="bulk-test", **LIMITS)
    with ServerStack(settings) as running:
        yield running


@pytest.fixture
def url(stack: ServerStack, redis_url: str) -> str:  # redis_url: the database emptied per test
    return f"http://127.0.0.1:{stack.http_port}"


@pytest.fixture
def client(url: str) -> Iterator[FewShotClient]:
    with FewShotClient(http_url=url, chunk_size=4) as opened:  # classify: within max_images
        yield opened


def bulk(url: str, items: list[tuple[str, bytes]], **params: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/examples:bulk",
        params=params,
        data={"labels": [label for label, _ in items]},
        files=[("files", (f"f{i}.png", data, "image/png")) for i, (_, data) in enumerate(items)],
    )


def test_one_request_adds_many_classes_and_they_classify(url: str, client: FewShotClient) -> None:
    items = [(f"class/{i % 7}", samples.noise_png(i)) for i in range(21)]
    response = bulk(url, items, namespace="shop")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["namespace"], body["added"], body["skipped"]) == ("shop", 21, 0)
    assert [c["label"] for c in body["classes"]] == [f"class/{i}" for i in range(7)]  # first appearance
    assert all(
        c["count"] == 3 and len(c["added_example_ids"]) == 3 and c["error"] is None for c in body["classes"]
    )
    assert sorted((c.label, c.count) for c in client.list_classes(namespace="shop")) == [
        (f"class/{i}", 3) for i in range(7)
    ]
    # One-image classes: each upload is its class's prototype, so it classifies as its class.
    solo = [(f"solo {i}", samples.noise_png(100 + i)) for i in range(6)]
    assert bulk(url, solo, namespace="solo").status_code == 200
    results = client.classify([data for _, data in solo], namespace="solo", top_k=1)
    assert [r[0].label for r in results] == [label for label, _ in solo]
    assert all(r[0].score > 0.999 for r in results)


def test_sending_the_same_bytes_again_skips_them(url: str, client: FewShotClient) -> None:
    items = [
        ("red", samples.solid_png((230, 20, 20))),
        ("green", samples.solid_png((20, 230, 20))),
    ]
    first = client.add_examples_bulk(items)
    assert (first.added, first.skipped) == (2, 0)
    red_id = first.classes[0].added_example_ids[0]
    # Again, with one new image and the red bytes twice more (once under another label: added there).
    again = client.add_examples_bulk(
        items + [("red", samples.noise_png(1)), ("red", items[0][1]), ("blue", items[0][1])]
    )
    assert (again.added, again.skipped) == (2, 3)
    by_label = {c.label: c for c in again.classes}
    assert by_label["red"].skipped == [(0, red_id), (3, red_id)] and by_label["red"].count == 2
    assert by_label["green"].added_example_ids == [] and by_label["green"].count == 1
    assert by_label["blue"].count == 1
    # Two copies in one request: the second is skipped as a copy of the first.
    twice = client.add_examples_bulk([("yellow", samples.noise_png(5)), ("yellow", samples.noise_png(5))])
    [yellow] = twice.classes
    assert yellow.count == 1 and yellow.skipped == [(1, yellow.added_example_ids[0])]


def test_files_added_one_class_at_a_time_are_skipped_by_a_bulk_add(url: str, client: FewShotClient) -> None:
    """A user adds a few examples in the playground, then imports the folder they came from."""
    cat, dog = [samples.noise_png(40), samples.noise_png(41)], samples.noise_png(42)
    added = client.add_examples("cat", cat)
    bulk_report = client.add_examples_bulk([("cat", cat[1]), ("cat", samples.noise_png(43)), ("dog", dog)])
    by_label = {c.label: c for c in bulk_report.classes}
    assert by_label["cat"].skipped == [(0, added.added_example_ids[1])]
    assert by_label["cat"].count == 3 and by_label["dog"].count == 1


def test_a_deleted_example_s_bytes_are_added_again(url: str, client: FewShotClient) -> None:
    image = samples.noise_png(7)
    [added] = client.add_examples_bulk([("cat", image), ("cat", samples.noise_png(8))]).classes
    client.delete_example("cat", added.added_example_ids[0])
    [again] = client.add_examples_bulk([("cat", image)]).classes
    assert again.skipped == [] and again.count == 2
    assert again.added_example_ids == ["3"]
    # A re-created namespace restarts its example ids: the old entry (id 3) must not match the new 3.
    client.delete_namespace("default")
    [fresh] = client.add_examples_bulk([("cat", samples.noise_png(20 + i)) for i in range(3)]).classes
    [cat] = client.add_examples_bulk([("cat", image)]).classes
    assert fresh.added_example_ids == ["1", "2", "3"] and cat.skipped == [] and cat.count == 4


def test_a_bad_file_refuses_the_request_whole_and_names_the_file(url: str, client: FewShotClient) -> None:
    items = [(f"c{i}", samples.noise_png(i)) for i in range(9)]
    client.add_examples_bulk(items[:1])  # skipped below: the bad file is the 6th of those sent on
    items[6] = ("c6", b"not an image at all")  # in the second decode job (4 images per request)
    response = bulk(url, items)
    assert response.status_code == 415, response.text  # as for a single add: not an image format
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["index"], body["file"]) == (6, "f6.png")  # its place in the request
    assert [c.label for c in client.list_classes()] == ["c0"]  # nothing of the request was added


@pytest.mark.parametrize(
    "labels, files, status",
    [
        (["a", "b"], 1, 422),  # a label per file
        ([], 1, 422),  # no labels at all
        (["a"] * 41, 41, 413),  # over --max-bulk-images
        (["a", ""], 2, 422),  # an empty label
    ],
)
def test_malformed_bulk_requests_are_refused_with_json(
    url: str, labels: list[str], files: int, status: int
) -> None:
    response = httpx.post(
        f"{url}/v1/examples:bulk",
        data={"labels": labels},
        files=[("files", (f"f{i}.png", samples.noise_png(i), "image/png")) for i in range(files)],
    )
    assert response.status_code == status, response.text
    assert response.json()["error"] and "bulk-test" not in response.text  # no key names


def test_a_class_over_its_cap_is_refused_alone(url: str, client: FewShotClient) -> None:
    items = [("big", samples.noise_png(i)) for i in range(7)] + [("small", samples.noise_png(99))]
    answer = client.add_examples_bulk(items)
    by_label = {c.label: c for c in answer.classes}
    assert by_label["big"].error and "limit of 6" in by_label["big"].error and by_label["big"].count == 0
    assert by_label["small"].count == 1 and answer.added == 1
    assert [c.label for c in client.list_classes()] == ["small"]


def test_fewshot_import_fills_and_resumes(url: str, client: FewShotClient, tmp_path: Path, capsys) -> None:
    root = tmp_path / "set"
    for c in range(5):
        (root / f"label {c}").mkdir(parents=True)
        for i in range(2):
            (root / f"label {c}" / f"{i}.png").write_bytes(samples.noise_png(10 * c + i))
    (root / "label 0" / "notes.txt").write_text("not an image file: not listed")
    args = ["import", str(root), "--url", url, "--namespace", "imp", "--batch", "3"]
    assert fewshot_main(args) == 0
    assert "added 10, skipped 0" in capsys.readouterr().out
    assert sorted((c.label, c.count) for c in client.list_classes(namespace="imp")) == [
        (f"label {c}", 2) for c in range(5)
    ]
    (root / "label 4" / "2.png").write_bytes(samples.noise_png(77))
    (root / "label 4" / "broken.png").write_bytes(b"\x89PNG but broken")
    assert fewshot_main(args) == 1  # a refused file: non-zero, after adding the rest
    captured = capsys.readouterr()
    assert "added 1, skipped 10" in captured.out
    assert "broken.png" in captured.err
    assert client.get_class("label 4", namespace="imp").count == 3


def test_fewshot_import_stops_non_zero_when_no_server_answers(tmp_path: Path, capsys) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(samples.noise_png(0))
    assert fewshot_main(["import", str(tmp_path), "--url", "http://127.0.0.1:9", "--timeout-s", "5"]) == 1
    assert "run again to resume" in capsys.readouterr().err


def test_bulk_add_on_the_cluster(tiny_model_path: Path, cluster_url: str) -> None:
    settings = stack_settings(tiny_model_path, cluster_url, redis_cluster=True, max_batch_size=4)
    with (
        ServerStack(settings) as stack,
        FewShotClient(http_url=f"http://127.0.0.1:{stack.http_port}") as client,
    ):
        items = [(f"k{i}", samples.noise_png(i)) for i in range(10)]
        for namespace in ("one", "two"):
            assert client.add_examples_bulk(items, namespace=namespace, batch_size=6).added == 10
            again = client.add_examples_bulk(items, namespace=namespace)
            assert (again.added, again.skipped) == (0, 10)
        results = client.classify([data for _, data in items], namespace="two", top_k=1)
        assert [r[0].label for r in results] == [label for label, _ in items]
