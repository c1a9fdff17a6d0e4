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


# --- the images' recipe (issue 34; tests/test_container_images.py builds and runs them) ----------


def pins() -> dict[str, str]:
    lines = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_tests_and_both_images_run_one_onnxruntime() -> None:
    import onnxruntime

    pinned = pins()
    assert pinned["onnxruntime"] == pinned["onnxruntime-gpu"]
    # The tests run the pinned runtime (make install-test installs with -c constraints.txt).
    assert onnxruntime.__version__.split(".")[:2] == pinned["onnxruntime"].split(".")[:2]
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert dockerfile.count("-c constraints.txt") == 2  # the cpu and the gpu requirements


def test_the_gpu_requirements_swap_only_onnxruntime(tmp_path) -> None:
    import importlib.util  # deploy/ is no package: the script as a module

    spec = importlib.util.spec_from_file_location(
        "image_requirements", REPO_ROOT / "deploy" / "image_requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pyproject = REPO_ROOT / "pyproject.toml"
    cpu, gpu = module.requirements(pyproject, "cpu"), module.requirements(pyproject, "gpu")
    changed = [(a, b) for a, b in zip(cpu, gpu, strict=True) if a != b]
    assert len(changed) == 1 and changed[0][0].startswith("onnxruntime")
    assert changed[0][1] == changed[0][0].replace("onnxruntime", "onnxruntime-gpu[cuda,cudnn]", 1)
    copy = tmp_path / "pyproject.toml"
    copy.write_text(pyproject.read_text())
    module.rewrite(copy)  # the gpu wheel's metadata: what the gpu image installs, so pip check passes
    assert module.requirements(copy, "cpu") == gpu
    with pytest.raises(SystemExit, match="exactly one onnxruntime"):
        module.rewrite(copy)


def test_images_are_named_in_full_and_the_build_needs_no_frontend_image() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert not dockerfile.startswith("# syntax")  # BuildKit would fetch that image on every build
    bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", dockerfile, re.M)
    assert bases and all(base.startswith("docker.io/") for base in bases)
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    for base in re.findall(r"^FROM (\S+)", dockerfile, re.M):
        assert base in stages or base.startswith("${"), base
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        # Pulled images in full (podman's default configuration refuses short names); built ones
        # are local tags.
        assert "build" in service or service["image"].startswith("docker.io/"), name


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    ignored = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert "!deploy/image_requirements.py" in ignored and "constraints.txt" not in ignored
