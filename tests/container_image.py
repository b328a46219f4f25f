"""Build the project's Dockerfile for real with podman, on a Debian bookworm base bootstrapped here.

No container registry is reachable from our machines, so the Dockerfile's default base
(python:3.11-slim-bookworm) cannot be pulled. ``ensure_base`` bootstraps the equivalent with mmdebstrap
(Debian's python3 3.11, venv, ca-certificates; docs, man pages and locales left out and apt's cache
cleaned after every install, as the official slim images do), cached under ``BASE_CACHE`` and
imported once. ``build`` runs ``podman build --format docker`` (Docker format keeps the HEALTHCHECK)
with ``BASE`` pointing at it, and lets pip inside the build see the host's package index configuration
(its pip config files, local wheel folders and CA bundle, mounted read-only; ``--network host``).

    python -m tests.container_image            # build the CPU image as shipped; prints build seconds and size
    python -m tests.container_image COMPILE_MAX_BATCH=1 COMPILE_AVX2_SET=0   # as the suite builds it

Facts of this machine, not of the image (so they stay out of the Dockerfile): podman 4.3 runs as root
with ``--runtime runc`` (crun refuses the hybrid cgroup v1 layout), and containers only start with
ulimits below the machine's own hard limits (``CONTAINERS_CONF`` below sets 10000).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_CACHE = Path(os.environ.get("DDPM_BASE_CACHE", "/var/cache/ddpm-base"))
# libpython3.11-dev: the C headers, which python:3.11-slim-bookworm has too (torch.compile's CPU backend
# builds the compiled U-Net against Python.h)
BASE_PACKAGES = ["python3", "python3-venv", "python-is-python3", "ca-certificates", "libpython3.11-dev"]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
IMAGE = "localhost/ddpm-serve:test-cpu"
CPU_IMAGE_GOAL_BYTES = 1.5e9
_CLEAN = '"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true";'
DOCKER_CLEAN = f"""DPkg::Post-Invoke {{ {_CLEAN} }};
APT::Update::Post-Invoke {{ {_CLEAN} }};
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=10000:10000", "nproc=10000:10000"]
[engine]
runtime = "runc"
"""


def tools_missing() -> list[str]:
    return [tool for tool in ("podman", "mmdebstrap") if shutil.which(tool) is None]


def podman_env() -> dict[str, str]:
    """The environment for podman commands: this machine's containers.conf (see the module doc)."""
    conf = Path(tempfile.gettempdir()) / "ddpm-containers.conf"
    if not conf.exists():
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, check: bool = True, timeout: float = 600, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env(), **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def _base_tag() -> str:
    recipe = json.dumps([BASE_PACKAGES, DEBIAN_MIRROR, DOCKER_CLEAN, "bookworm", "slim-excludes-1"])
    return "localhost/ddpm-base:bookworm-py311-" + hashlib.sha256(recipe.encode()).hexdigest()[:12]


def ensure_base() -> str:
    """The bootstrapped base image's tag: imported already, or from the cached tarball, or bootstrapped (~1 min)."""
    tag = _base_tag()
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    BASE_CACHE.mkdir(parents=True, exist_ok=True)
    tarball = BASE_CACHE / (tag.rsplit(":", 1)[1] + ".tar")
    if not tarball.exists():
        hook_file = BASE_CACHE / "docker-clean"
        hook_file.write_text(DOCKER_CLEAN)
        partial = tarball.with_suffix(".partial.tar")
        cmd = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES)]
        for path in ("doc", "man", "locale", "info"):
            cmd.append(f"--dpkgopt=path-exclude=/usr/share/{path}/*")
        cmd += ["--dpkgopt=path-include=/usr/share/doc/*/copyright",
                f'--customize-hook=cp {hook_file} "$1/etc/apt/apt.conf.d/docker-clean"',
                '--customize-hook=rm -rf "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/*',
                "bookworm", str(partial), DEBIAN_MIRROR]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=900)
        partial.rename(tarball)
    podman("import", str(tarball), tag)
    return tag


def _pip_config_mounts() -> list[str]:
    """The host's pip configuration and the local folders it names, read-only, at the same paths."""
    mounts = []
    for path in ("/etc/pip.conf", "/etc/xdg/pip", "/opt/wheels", "/opt/pypi", "/opt/pypi-more"):
        if Path(path).exists():
            mounts += ["-v", f"{path}:{path}:ro"]
    user_conf = Path.home() / ".config" / "pip"
    if user_conf.exists():
        mounts += ["-v", f"{user_conf}:/root/.config/pip:ro"]  # the build runs as root
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        mounts += ["-v", f"{bundle}:{bundle}:ro"]
    return mounts


def build(tag: str = IMAGE, torch_index: str = "https://pypi.org/simple", **build_args: str) -> dict[str, object]:
    """Build the CPU image (``TORCH_INDEX`` set: the CPU torch, no triton) from this checkout; ``build_args``
    are the Dockerfile's other ARGs (COMPILE_MAX_BATCH, COMPILE_AVX2_SET)."""
    base = ensure_base()
    start = time.monotonic()
    args = [f"{name}={value}" for name, value in {"BASE": base, "TORCH_INDEX": torch_index, **build_args}.items()]
    podman("build", "--network", "host", "--format", "docker", *_pip_config_mounts(),
           *(a for arg in args for a in ("--build-arg", arg)), "-t", tag, str(ROOT), timeout=1800)  # fmt: skip
    seconds = time.monotonic() - start
    size = int(podman("image", "inspect", tag, "--format", "{{.Size}}").stdout.strip())
    base_size = int(podman("image", "inspect", base, "--format", "{{.Size}}").stdout.strip())
    return {"image": tag, "base": base, "build_seconds": round(seconds, 1), "size_bytes": size, "base_size_bytes": base_size}


if __name__ == "__main__":
    import sys

    print(json.dumps(build(**dict(arg.split("=", 1) for arg in sys.argv[1:])), indent=2))
