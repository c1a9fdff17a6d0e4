"""deploy/k8s: every manifest valid against the Kubernetes API schemas (strict: no unknown field),
the kustomization complete, and the names that tie the objects together consistent.

The schemas ship inside the kubernetes-validate wheel: this runs offline, without kubectl."""

from __future__ import annotations

import copy
import os
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fewshot_service.settings import Settings

from conftest import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests target (autoscaling/v2 and policy/v1 are GA since 1.23).
K8S_VERSION = "1.30"


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


def resources() -> list[dict[str, Any]]:
    """Every object of every file the kustomization lists, in order."""
    objects = []
    for name in kustomization()["resources"]:
        objects += [doc for doc in yaml.safe_load_all((K8S_DIR / name).read_text()) if doc]
    return objects


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def test_the_kustomization_lists_every_manifest_in_the_folder() -> None:
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)


@pytest.mark.parametrize("resource", resources(), ids=lambda r: f"{r['kind']}/{r['metadata']['name']}")
def test_each_manifest_is_valid_in_strict_mode(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_the_validator_refuses_an_unknown_field() -> None:
    """Guards the test above: strict validation does reject what a typo produces."""
    broken = copy.deepcopy(find("Deployment", "fewshot"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_objects_refer_to_each_other_by_the_right_names() -> None:
    deployment = find("Deployment", "fewshot")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in ("fewshot-http", "fewshot-grpc"):
        assert find("Service", service)["spec"]["selector"].items() <= labels.items()
    assert find("Service", "fewshot-grpc")["spec"]["clusterIP"] == "None"  # one DNS record per pod
    assert find("PodDisruptionBudget", "fewshot")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = find("HorizontalPodAutoscaler", "fewshot")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "fewshot")

    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["containerPort"] for p in container["ports"]} == {8000, 50051}
    assert container["envFrom"][0]["configMapRef"]["name"] == "fewshot-config"

    valkey = find("StatefulSet", "valkey")
    assert (
        valkey["spec"]["serviceName"] == "valkey" and find("Service", "valkey")["spec"]["clusterIP"] == "None"
    )
    assert "valkey-0.valkey:6379" in next(e["value"] for e in container["env"] if e["name"] == "REDIS_URL")
    assert "appendonly yes" in find("ConfigMap", "valkey-config")["data"]["valkey.conf"]
    assert valkey["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # Both sides read the password from the same Secret.
    secret_of = lambda c: {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}  # noqa: E731
    assert secret_of(container) == secret_of(valkey["spec"]["template"]["spec"]["containers"][0])


def test_the_config_map_holds_only_settings_the_server_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    data = find("ConfigMap", "fewshot-config")["data"]
    for name in list(os.environ):
        if name.startswith("FEWSHOT_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("REDIS_URL", "redis://valkey-0.valkey:6379/0")
    settings = Settings()  # extra="forbid" does not cover the environment: check each name below
    fields = {f"FEWSHOT_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, set(data) - fields
    assert (settings.http_port, settings.grpc_port, settings.redis_cluster) == (8000, 50051, False)
    # Protected mode: the ConfigMap alone listens on loopback; the Deployment's --api-keys opens it.
    assert settings.host == "127.0.0.1"
    assert Settings(api_keys="/etc/fewshot/api-keys/api-keys").host == "0.0.0.0"
