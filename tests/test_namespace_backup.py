"""``fewshot export-namespace`` / ``import-namespace`` with real parts: a namespace filled by real
servers of two models (a private Redis, the real exported models), written to a file, restored
into another Redis database and into the Redis Cluster: same classes, examples, stored images and
hashes, bit-identical prototypes of both models, the same answers."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from fewshot_client import FewShotClient
from fewshot_common.cli import main as fewshot_main
from fewshot_service.app import ServerStack
from fewshot_service.registry.redis_client import connect_redis
from fewshot_service.registry.registry import Registry

import image_samples as samples
from conftest import stack_settings

QUERIES = [samples.noise_png(500 + i) for i in range(4)]


def other_db(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/1"


def fill(tiny_model_path: Path, other_model_path: Path, url: str) -> dict[str, list]:
    """A namespace with a few classes, embedded by both models; each model's answers."""
    items = [(f"class {c % 4}/x", samples.noise_png(c)) for c in range(10)]
    answers = {}
    with ServerStack(stack_settings(tiny_model_path, url)) as stack:
        with FewShotClient(http_url=f"http://127.0.0.1:{stack.http_port}") as client:
            client.add_examples_bulk(items, namespace="shop")
            client.delete_example("class 0/x", "1", namespace="shop")  # ids with a gap
            answers[stack.core.model_id] = classify(client, "shop")
    with ServerStack(stack_settings(other_model_path, url)) as stack:  # fills its embeddings on demand
        with FewShotClient(http_url=f"http://127.0.0.1:{stack.http_port}") as client:
            answers[stack.core.model_id] = classify(client, "shop")
    return answers


def classify(client: FewShotClient, namespace: str) -> list:
    return [[(p.label, p.score) for p in r] for r in client.classify(QUERIES, namespace=namespace, top_k=3)]


def dump(client: redis.Redis | RedisCluster, registry: Registry, namespace: str) -> dict[str, object]:
    """Every stored value of the namespace that a restore must reproduce, by role."""
    keys = registry.keys(namespace)
    labels = sorted(client.hkeys(keys.counts))
    out: dict[str, object] = {
        "counts": client.hgetall(keys.counts),
        "models": client.hgetall(keys.models),
    }
    for field in labels:
        label = bytes.fromhex(field.decode()).decode()
        out[f"img {label}"] = client.hgetall(keys.images(label))
        for model in client.hkeys(keys.models):
            mk = keys.model(model.decode())
            out[f"ex {model} {label}"] = client.hgetall(mk.examples(label))
    for model in client.hkeys(keys.models):
        mk = keys.model(model.decode())
        out[f"protos {model}"] = client.hgetall(mk.prototypes)  # bytes: bit for bit
        out[f"sums {model}"] = client.hgetall(mk.sums)
        out[f"mcounts {model}"] = client.hgetall(mk.counts)
    state = client.hgetall(keys.state)
    out["state"] = {k: state[k] for k in (b"examples", b"next_example_id") if k in state}
    out["embedded"] = {k: v for k, v in state.items() if k.startswith(b"n:")}
    return out


def test_round_trip_into_another_database_and_the_cluster(
    tiny_model_path: Path,
    other_model_path: Path,
    redis_url: str,
    cluster_url: str,
    tmp_path: Path,
    capsys,
) -> None:
    answers = fill(tiny_model_path, other_model_path, redis_url)
    assert len(answers) == 2
    source = connect_redis(redis_url)
    expected = dump(source, Registry(source), "shop")
    assert len(expected["embedded"]) == 2  # both models' embeddings are in the namespace

    file = tmp_path / "shop.fewshot.zip"
    assert (
        fewshot_main(
            [
                "export-namespace",
                "--namespace",
                "shop",
                "--output",
                str(file),
                "--redis-url",
                redis_url,
            ]
        )
        == 0
    )
    assert "4 classes, 9 examples" in capsys.readouterr().out
    with zipfile.ZipFile(file) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert (manifest["format"], manifest["version"], manifest["namespace"]) == (
            "fewshot-namespace",
            1,
            "shop",
        )
        assert not any(name.endswith(".pkl") for name in archive.namelist())

    target_db = other_db(redis_url)
    assert (
        fewshot_main(
            [
                "import-namespace",
                str(file),
                "--namespace",
                "copy",
                "--redis-url",
                target_db,
            ]
        )
        == 0
    )
    restored = connect_redis(target_db)
    assert dump(restored, Registry(restored), "copy") == expected

    assert (
        fewshot_main(
            [
                "import-namespace",
                str(file),
                "--redis-url",
                cluster_url,
                "--redis-cluster",
            ]
        )
        == 0
    )
    cluster = connect_redis(cluster_url, cluster=True)
    assert dump(cluster, Registry(cluster), "shop") == expected

    # The restored namespaces answer as the source did, with each model (the same bits in, out).
    for url, namespace, extra in (
        (target_db, "copy", {}),
        (cluster_url, "shop", {"redis_cluster": True}),
    ):
        for model in (tiny_model_path, other_model_path):
            with ServerStack(stack_settings(model, url, **extra)) as stack:
                with FewShotClient(http_url=f"http://127.0.0.1:{stack.http_port}") as client:
                    assert classify(client, namespace) == answers[stack.core.model_id]
                    # The content hashes came along: re-sending an example's bytes adds nothing.
                    again = client.add_examples_bulk(
                        [("class 1/x", samples.noise_png(1))], namespace=namespace
                    )
                    assert (again.added, again.skipped) == (0, 1)


def test_a_namespace_holding_classes_is_replaced_only_when_asked(
    tiny_model_path: Path, redis_url: str, tmp_path: Path, capsys
) -> None:
    with ServerStack(stack_settings(tiny_model_path, redis_url)) as stack:
        with FewShotClient(http_url=f"http://127.0.0.1:{stack.http_port}") as client:
            client.add_examples_bulk(
                [("a", samples.noise_png(1)), ("b", samples.noise_png(2))],
                namespace="one",
            )
            client.add_examples_bulk([("z", samples.noise_png(3))], namespace="two")
            file = tmp_path / "one.zip"
            flags = ["--redis-url", redis_url]
            assert (
                fewshot_main(
                    [
                        "export-namespace",
                        "--namespace",
                        "one",
                        "--output",
                        str(file),
                        *flags,
                    ]
                )
                == 0
            )
            assert fewshot_main(["import-namespace", str(file), "--namespace", "two", *flags]) == 1
            assert "holds classes" in capsys.readouterr().err
            assert [c.label for c in client.list_classes(namespace="two")] == ["z"]
            assert (
                fewshot_main(
                    [
                        "import-namespace",
                        str(file),
                        "--namespace",
                        "two",
                        "--replace",
                        *flags,
                    ]
                )
                == 0
            )
            # The server that cached the old "two" sees the new one (a new epoch) on its next request.
            assert [c.label for c in client.list_classes(namespace="two")] == ["a", "b"]
            assert client.classify(samples.noise_png(2), namespace="two", top_k=1)[0][0].label == "b"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a zip", "File is not a zip file"),
        ({"format": "fewshot-namespace", "version": 99}, "reads version 1"),
        ({"format": "something-else", "version": 1}, "not a fewshot-namespace file"),
    ],
)
def test_a_file_that_is_not_a_version_1_namespace_file_is_refused(
    content: object, message: str, redis_url: str, tmp_path: Path, capsys
) -> None:
    file = tmp_path / "bad.zip"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        with zipfile.ZipFile(file, "w") as archive:
            archive.writestr("manifest.json", json.dumps(content))
    assert fewshot_main(["import-namespace", str(file), "--redis-url", redis_url]) == 1
    assert message in capsys.readouterr().err


def test_exporting_an_empty_namespace_or_without_a_url_is_refused(
    redis_url: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "x.zip"
    assert (
        fewshot_main(
            [
                "export-namespace",
                "--namespace",
                "nothing",
                "--output",
                str(out),
                "--redis-url",
                redis_url,
            ]
        )
        == 1
    )
    assert "holds no classes" in capsys.readouterr().err and not out.exists()
    assert fewshot_main(["export-namespace", "--output", str(out)]) == 2
    assert "redis_url" in capsys.readouterr().err
