"""fewshot on a real Redis Cluster: two server replicas sharing it, namespaces spread over its
masters, ``fewshot serve`` configured from the environment, and a master failover."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_e2e import COLOURS, add, grpc_of, http_of, photo

from fewshot_common.errors import Unavailable
from fewshot_service.app import ServerStack
from fewshot_service.registry.redis_client import connect_redis
from fewshot_service.registry.registry import Registry

from conftest import stack_settings
from redis_cluster import LocalCluster, wait_for_replica_to_catch_up

MODEL = "vit_test-000000000001"


def state_key(namespace: str, prefix: str = "fewshot") -> str:
    return f"{prefix}:{{ns:{namespace.encode().hex()}}}:state"


def rand(n: int, seed: int, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_a_class_added_on_one_replica_is_classified_by_the_other(
    tiny_model_path: Path, cluster_url: str
) -> None:
    settings = stack_settings(tiny_model_path, cluster_url, redis_cluster=True)
    with ServerStack(settings) as a, ServerStack(settings) as b:
        add(http_of(a), "red", [photo(COLOURS["red"], s) for s in range(5)], namespace="shop")
        add(http_of(a), "blue", [photo(COLOURS["blue"], s) for s in range(5)], namespace="shop")
        with grpc_of(b) as client:
            results = client.classify(
                [photo(COLOURS["red"], 99), photo(COLOURS["blue"], 98)], namespace="shop"
            )
            assert [r[0].label for r in results] == ["red", "blue"]
            assert httpx.delete(f"{http_of(b)}/v1/classes/blue?namespace=shop").status_code == 200
            assert [p.label for p in client.classify([photo(COLOURS["blue"], 98)], namespace="shop")[0]] == [
                "red"
            ]
        assert httpx.get(f"{http_of(a)}/readyz").status_code == 200
        classes = httpx.get(f"{http_of(a)}/v1/classes?namespace=shop").json()["classes"]
        assert [c["label"] for c in classes] == ["red"]


def test_namespaces_spread_over_the_masters_and_each_stays_in_one_slot(
    cluster_url: str, redis_cluster: LocalCluster
) -> None:
    client = connect_redis(cluster_url, cluster=True)
    registry = Registry(client)
    namespaces = [f"tenant-{i}" for i in range(12)]
    for seed, namespace in enumerate(namespaces):
        registry.add_examples(namespace, "cat", rand(2, seed), MODEL)
        registry.add_examples(namespace, "dog", rand(2, 100 + seed), MODEL)
    owners = set()
    for namespace in namespaces:
        keys = [k for k in client.scan_iter(match=f"fewshot:{{ns:{namespace.encode().hex()}}}:*")]
        assert len(keys) >= 5  # model, state, counts, prototypes, sums, ex:<label> ...
        assert len({client.keyslot(k) for k in keys}) == 1  # a namespace never spans slots
        owners.add(redis_cluster.node_serving(state_key(namespace)).port)
        assert registry.prototypes(namespace, MODEL).labels == ["cat", "dog"]
    assert len(owners) == 3  # 12 namespaces land on all three masters
    client.close()


def test_serve_reads_the_cluster_flag_from_the_environment(
    serve_process, tiny_model_path: Path, cluster_url: str
) -> None:
    server = serve_process(
        ["--model", tiny_model_path],
        env={"REDIS_URL": cluster_url, "FEWSHOT_REDIS_CLUSTER": "true"},
    ).wait_ready()
    add(server.http_url, "green", [photo(COLOURS["green"], s) for s in range(3)])
    assert httpx.get(f"{server.http_url}/readyz").status_code == 200
    # The class went to the cluster: a cluster client of our own sees it.
    with connect_redis(cluster_url, cluster=True) as client:
        assert [c.label for c in Registry(client).list_classes("default")] == ["green"]


def test_serve_refuses_the_cluster_flag_without_a_url(serve_process, tiny_model_path: Path) -> None:
    server = serve_process(["--model", tiny_model_path, "--redis-cluster"])
    assert server.process.wait(timeout=60) == 2
    assert "redis_cluster needs a Redis URL" in server.output()


@pytest.mark.slow
def test_a_master_failover_is_unavailable_briefly_then_served_by_the_promoted_replica(
    tmp_path: Path,
) -> None:
    with LocalCluster(tmp_path / "cluster", masters=3, replicas_per_master=1) as cluster:
        writer = Registry(connect_redis(cluster.url, timeout_s=0.5, cluster=True))
        reader = Registry(connect_redis(cluster.url, timeout_s=0.5, cluster=True))
        writer.add_examples("default", "cat", rand(3, 1), MODEL)
        assert reader.prototypes("default", MODEL).labels == ["cat"]
        master = cluster.node_serving(state_key("default"))
        replica = cluster.replica_of(master)
        wait_for_replica_to_catch_up(master, replica)

        master.kill()
        # While the cluster notices (node timeout 1 s) and promotes the replica, calls fail fast
        # with Unavailable (never another exception); then the same clients work again.
        deadline = time.monotonic() + 30

        def once_promoted(call: Callable[[], Any]) -> tuple[Any, int]:
            # Each client meets the dead master on its own first call: retried until the deadline.
            failures = 0
            while True:
                try:
                    return call(), failures
                except Unavailable:
                    failures += 1
                    assert time.monotonic() < deadline, "no replica took over within 30 s"
                    time.sleep(0.2)

        _, failures = once_promoted(lambda: writer.add_examples("default", "dog", rand(3, 2), MODEL))
        assert failures >= 1  # the first call after the kill did meet the dead master
        with replica.client() as promoted:
            assert promoted.info("replication")["role"] == "master"
        # The reader's map of the slots still names the dead master until its own call fails (it
        # did once in CI, under load); after that it must read everything the writer wrote.
        state, _ = once_promoted(lambda: reader.prototypes("default", MODEL))
        assert state.labels == ["cat", "dog"]  # nothing was lost
        assert writer.get_class("default", "cat").count == 3
