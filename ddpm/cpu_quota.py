"""The CPUs this process may use per scheduling period: its cgroup's CPU quota (a container's ``--cpus``, a
Kubernetes pod's CPU limit).

PyTorch sizes its CPU thread pool by the CPUs the process may run on (its affinity), not by the quota: in a
container limited to 1 CPU on a 2-core host it ran 2 threads, which the kernel then throttled for the rest of
each period. Measured (2026-12-07, 2-core Xeon, the image with ``--cpus 1``, compile off, a 16-image 10-call
request): 0.47 s with PyTorch's 2 threads, 0.32 s with ``DDPM_THREADS=1``. On a 64-core host with a 2-CPU
limit it would be 64 threads. So the server's default (``DDPM_THREADS=0``) is PyTorch's, capped at the whole
CPUs of the quota (at least 1): what Go's ``automaxprocs`` does for GOMAXPROCS, in the same way (the quota file
under the process's own cgroup, else at the root of the cgroup mount, which is the container's own). So are
``ddpm train``, ``distill``, ``sample`` and ``eval`` with ``--threads 0`` (their default).

cgroup v2: ``cpu.max`` ("max 100000", or "150000 100000": 1.5 CPUs). v1: ``cpu.cfs_quota_us`` (-1: none) over
``cpu.cfs_period_us``.
"""

from __future__ import annotations

import math
from pathlib import Path

from ddpm.cgroup import CGROUP_ROOT, PROC_CGROUP, group_dirs, read


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs per period the cgroup allows (1.5 for ``--cpus 1.5``); None without a quota or a readable cgroup."""
    for directory in group_dirs("", root, proc_cgroup):
        text = read(directory / "cpu.max")
        if text is not None:
            quota, _, period = text.partition(" ")
            return _ratio(quota, period or "100000")  # "max": no quota
    for directory in group_dirs("cpu", root, proc_cgroup):
        quota, period = read(directory / "cpu.cfs_quota_us"), read(directory / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return _ratio(quota, period)  # -1: no quota
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max", or a file this does not understand: no cap rather than a wrong one
        return None
    return q / p if q > 0 and p > 0 else None


def threads_within_quota(default: int, quota: float | None) -> int:
    """PyTorch's ``default`` thread count, capped at the quota's whole CPUs (at least 1)."""
    return default if quota is None else max(1, min(default, math.floor(quota)))


def set_torch_threads(requested: int) -> str | None:
    """``requested`` torch threads (> 0), else PyTorch's default capped at the quota; says so when it capped it."""
    import torch

    if requested:
        torch.set_num_threads(requested)
        return None
    default, quota = torch.get_num_threads(), cpu_quota()
    threads = threads_within_quota(default, quota)
    if threads == default:
        return None
    torch.set_num_threads(threads)
    return f"torch threads: {threads}, the cgroup's CPU quota ({quota:.2f} CPUs; PyTorch's default was {default})"
