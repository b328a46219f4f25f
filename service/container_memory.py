"""The replica's memory as the kernel counts it: its cgroup's limit and working set, for the gauges
``ddpm_memory_limit_bytes`` and ``ddpm_memory_working_set_bytes`` and the alert ``DdpmMemoryNearLimit``.

Past the limit the kernel kills the process (exit 137) and nothing reaches the log, so the approach has to be seen
from outside: a CPU replica of the shipped model peaked at 991 MiB of its container's memory during its compile
(README, "Memory"). The working set is what the kubelet and cAdvisor count: usage less the inactive file pages the
kernel can reclaim; a tmpfs's pages (``/tmp`` in the image) stay in it. It is the cgroup's, not the process's: the
whole container in one, a systemd service's group, or the whole host where the process sits at the root (no limit
there: the alert cannot fire). None (NaN on the gauge) without a limit or a readable cgroup.

v2: ``memory.max`` ("max": none), ``memory.current``, ``memory.stat``'s ``inactive_file``. v1: ``memory.limit_in_bytes``
(no limit: a page-rounded 2^63 - 1), ``memory.usage_in_bytes``, ``memory.stat``'s ``total_inactive_file``.
"""

from __future__ import annotations

from pathlib import Path

from ddpm.cgroup import CGROUP_ROOT, PROC_CGROUP, group_dirs, read

V1_UNLIMITED = 2**62  # v1 writes "no limit" as 9223372036854771712


def _integer(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _stat(text: str | None, name: str) -> int:
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return _integer(value) or 0
    return 0


def memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """Bytes the cgroup may use before the kernel reclaims and then kills; None without a limit."""
    for directory in group_dirs("", root, proc_cgroup):
        text = read(directory / "memory.max")
        if text is not None:
            return _integer(text)  # "max": None
    for directory in group_dirs("memory", root, proc_cgroup):
        limit = _integer(read(directory / "memory.limit_in_bytes"))
        if limit is not None:
            return limit if limit < V1_UNLIMITED else None
    return None


def memory_working_set(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """Bytes the cgroup uses that the kernel cannot simply drop (usage less inactive file pages)."""
    for directory in group_dirs("", root, proc_cgroup):
        usage = _integer(read(directory / "memory.current"))
        if usage is not None:
            return max(0, usage - _stat(read(directory / "memory.stat"), "inactive_file"))
    for directory in group_dirs("memory", root, proc_cgroup):
        usage = _integer(read(directory / "memory.usage_in_bytes"))
        if usage is not None:
            return max(0, usage - _stat(read(directory / "memory.stat"), "total_inactive_file"))
    return None
