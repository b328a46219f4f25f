"""This process's cgroup: where the kernel's files about it are (the limits it enforces, what it counts).

``/proc/self/cgroup`` names the process's group per controller: ``0::/path`` for v2's unified hierarchy,
``N:cpu,cpuacct:/path`` for v1. Inside a container the group is mounted at the root of ``/sys/fs/cgroup`` (a
namespace of its own, or runc's bind mount of the v1 group) while ``/proc`` may still name the host's path; so a file
is looked for under the named path, then at the mount's root: what Go's ``automaxprocs`` does for the CPU quota.
Read by ``ddpm.cpu_quota`` (the server's thread count) and ``service.container_memory`` (the memory gauges).
"""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
V1_MOUNTS = {"cpu": ("cpu", "cpu,cpuacct", "cpuacct,cpu"), "memory": ("memory",)}  # v1: a controller's mount directories


def own_paths(proc_cgroup: Path = PROC_CGROUP) -> dict[str, str]:
    """Controller -> this process's group ("" for v2's unified hierarchy), from ``/proc/self/cgroup``."""
    paths: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2].lstrip("/")
    return paths


def group_dirs(controller: str, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> list[Path]:
    """Where ``controller``'s files for this process may be, most specific first: v2's group (controller "") or v1's
    (``controller``'s mount directories)."""
    own = own_paths(proc_cgroup)
    if controller == "":
        return [root / own[""], root] if "" in own else [root]
    return [d for name in V1_MOUNTS[controller] for d in (root / name / own.get(controller, ""), root / name)]


def read(path: Path) -> str | None:
    """A cgroup file's text, stripped; None where it is not there (another version, no such controller)."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
