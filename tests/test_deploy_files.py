"""The deployment files say what the server does: the env example is inert until edited and names
real settings, and the compose file runs anywhere by default with no port published twice."""

from __future__ import annotations

import re

import pytest
import yaml

from fewshot_service.settings import Settings

from conftest import REPO_ROOT

ENV_EXAMPLE = REPO_ROOT / "deploy" / "fewshot.env.example"
ASSIGNMENT = re.compile(r"^#?\s*([A-Z_]+)=(\S*)$")


def test_env_example_sets_nothing_until_a_line_is_uncommented() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    active = [line for line in lines if line.strip() and not line.startswith("#")]
    assert active == []  # an uncommented REDIS_URL once switched off the embedded Redis


def test_every_variable_in_the_env_example_is_a_setting_that_accepts_the_value_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    matches = (ASSIGNMENT.match(line) for line in ENV_EXAMPLE.read_text().splitlines())
    shown = dict(m.groups() for m in matches if m)
    assert len(shown) >= 15
    for name, value in shown.items():
        field = "redis_url" if name == "REDIS_URL" else name.removeprefix("FEWSHOT_").lower()
        assert field in Settings.model_fields, f"{name} is no setting"
        monkeypatch.setenv(name, value)
        assert getattr(Settings(), field) not in (None, [], ""), name
        monkeypatch.delenv(name)


def test_compose_default_is_the_cpu_server_and_no_host_port_is_published_twice() -> None:
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"redis", "fewshot"}
    assert services["fewshot"]["build"]["target"] == "cpu"
    gpu = services["fewshot-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    # address:host_port:container_port, with the defaults of the ${VAR:-default} filled in.
    published = [
        re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", port).rsplit(":", 1)[0]
        for service in services.values()
        for port in service.get("ports", [])
    ]
    assert len(published) == 4 and len(set(published)) == 4
    # Protected by default (issue 13): the servers run without API keys, so the host publishes
    # them on its loopback only.
    assert all(address.startswith("127.0.0.1:") for address in published), published


def test_compose_keys_override_mounts_a_key_file_for_every_server() -> None:
    base = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    override = yaml.safe_load((REPO_ROOT / "deploy" / "compose.api-keys.yml").read_text())
    servers = {name for name in base if name != "redis"}
    assert set(override["services"]) == servers
    for name in servers:
        service = override["services"][name]
        assert service["secrets"] == ["api-keys"]
        assert service["environment"]["FEWSHOT_API_KEYS"] == "/run/secrets/api-keys"
    assert "api-keys" in override["secrets"]


def test_compose_redis_needs_a_password() -> None:
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert "--requirepass" in services["redis"]["command"]
    assert "redis://:${FEWSHOT_REDIS_PASSWORD" in services["fewshot"]["environment"]["REDIS_URL"]
    assert "protected-mode yes" in (REPO_ROOT / "deploy" / "redis.conf").read_text()


def test_the_images_health_check_is_readiness() -> None:
    lines = (REPO_ROOT / "Dockerfile").read_text().splitlines()
    checks = [line for line in lines if line.strip().startswith("CMD")]
    assert len(checks) == 2 and all("/readyz" in line for line in checks)
