"""Podman for tests/test_container_images.py: the images the Dockerfile starts from, made locally
from Debian packages, and builds that reach PyPI the way this host does.

CI machines reach Debian's mirror and PyPI but no image registry, so the bases the Dockerfile and
docker-compose.yml name are made with mmdebstrap and tagged under those names. Where the real
image is already in local storage (no label of ours) it is used as is. The root filesystems are
cached outside the clone, keyed by the hash of their recipe; podman's layer cache keeps the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("FEWSHOT_CI_CACHE", "/var/cache/fewshot-ci"))
RECIPE_LABEL = "org.fewshot.ci.recipe"
# The engine settings these machines need (cgroups v1/v2 hybrid: runc, not crun; a hard nofile
# limit of 20000, below podman's default; no catatonit, so tini for compose's `init: true`).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
init_path = "/usr/bin/tini-static"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
ENGINE_PACKAGES = "podman buildah runc tini mmdebstrap uidmap"


@dataclass(frozen=True)
class BaseRecipe:
    """A stand-in for a registry image: Debian packages, hooks, and the image's own settings."""

    image: str
    packages: tuple[str, ...]
    hooks: tuple[str, ...]
    changes: tuple[str, ...]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:16]


# python:3.11-slim-bookworm keeps python and pip in /usr/local/bin: a venv there does the same.
PYTHON_BASE = BaseRecipe(
    image="docker.io/library/python:3.11-slim-bookworm",
    packages=("python3", "python3-venv", "python3-pip", "ca-certificates"),
    hooks=('chroot "$1" python3 -m venv /usr/local',),
    changes=("ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["python3"]'),
)
# Valkey speaks Redis' protocol and reads its configuration: Debian's Redis under Valkey's names.
VALKEY_BASE = BaseRecipe(
    image="docker.io/valkey/valkey:8.1",
    packages=("redis-server",),
    hooks=(
        'ln -s /usr/bin/redis-server "$1"/usr/local/bin/valkey-server',
        'ln -s /usr/bin/redis-cli "$1"/usr/local/bin/valkey-cli',
        'mkdir -p "$1"/data "$1"/usr/local/etc/valkey',
    ),
    changes=('CMD ["valkey-server"]',),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def host_ca_bundle() -> Path | None:
    """The CA bundle this host's pip trusts (a proxy's CA included), for builds to mount."""
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


class Podman:
    """``podman`` with this project's engine settings (a private containers.conf)."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        CACHE.mkdir(parents=True, exist_ok=True)
        conf = CACHE / "containers.conf"
        if not conf.is_file() or conf.read_text() != CONTAINERS_CONF:
            conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    @classmethod
    def find(cls) -> Podman | None:
        executable = shutil.which("podman")
        needed = ("runc", "mmdebstrap", "tini-static")
        if executable is None or any(shutil.which(tool) is None for tool in needed):
            return None
        return cls(executable)

    def run(
        self, *args: str, timeout: float = 120, check: bool = True, **kwargs
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.executable, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args[:3])} failed ({result.returncode}):\n{result.stderr[-4000:]}"
            )
        return result

    def label(self, image: str, name: str) -> str | None:
        """``name``'s value on a local image; None when the image is absent."""
        result = self.run("image", "inspect", "--format", "{{json .Config.Labels}}", image, check=False)
        if result.returncode != 0:
            return None
        return (json.loads(result.stdout.strip() or "null") or {}).get(name, "")

    def ensure_base(self, recipe: BaseRecipe) -> str:
        """The recipe's image in local storage: the real one if present, else our stand-in made
        (or taken from the cache) now. Returns how it was got, for the test's report."""
        found = self.label(recipe.image, RECIPE_LABEL)
        if found == recipe.key:
            return "stand-in, in local storage"
        if found == "":
            return "the real image, in local storage"
        tarball = CACHE / "bases" / f"{recipe.image.rsplit('/', 1)[-1].replace(':', '-')}-{recipe.key}.tar"
        how = "stand-in, imported from the cache"
        if not tarball.is_file():
            tarball.parent.mkdir(parents=True, exist_ok=True)
            partial = tarball.with_suffix(".partial.tar")  # mmdebstrap picks its output format by suffix
            hooks = [f"--customize-hook={hook}" for hook in recipe.hooks]
            subprocess.run(
                [
                    "mmdebstrap",
                    "--quiet",
                    "--variant=minbase",
                    f"--include={','.join(recipe.packages)}",
                    *hooks,
                    '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
                    "bookworm",
                    str(partial),
                ],
                check=True,
                capture_output=True,
                timeout=900,
            )
            partial.rename(tarball)
            how = "stand-in, made with mmdebstrap"
        changes = [
            arg
            for change in (*recipe.changes, f"LABEL {RECIPE_LABEL}={recipe.key}")
            for arg in ("--change", change)
        ]
        self.run("import", *changes, str(tarball), recipe.image, timeout=300)
        return how

    def build(self, target: str, tag: str, context: Path, *, timeout: float = 1800) -> float:
        """``podman build`` of one target as a user would, plus this host's CA bundle (which its
        PyPI access needs), mounted read-only at build time, never copied into a layer.
        --format docker keeps the HEALTHCHECK. Returns the seconds it took."""
        mounts: list[str] = []
        ca = host_ca_bundle()
        if ca is not None:
            mounts += ["--volume", f"{ca}:/etc/ssl/certs/ca-certificates.crt:ro"]
        start = time.monotonic()
        self.run(
            "build",
            "--format",
            "docker",
            "--target",
            target,
            "--tag",
            tag,
            *mounts,
            str(context),
            timeout=timeout,
        )
        return time.monotonic() - start

    def size_mb(self, image: str) -> float:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout) / 1e6

    def wait_ready(self, url: str, container: str, timeout: float = 90) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            state = self.run(
                "inspect", "--format", "{{.State.Status}}", container, check=False
            ).stdout.strip()
            if state in ("exited", "stopped"):
                break
            time.sleep(0.5)
        logs = self.run("logs", container, check=False)
        raise AssertionError(f"{container} never became ready:\n{(logs.stdout + logs.stderr)[-4000:]}")
