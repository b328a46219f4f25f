"""The replica's cgroup memory limit and working set (service/container_memory.py) read from cgroup trees laid out as v1
and v2 show them, and exported as gauges. The real cgroup of a container: tests/test_container.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from service.container_memory import memory_limit, memory_working_set
from service.metrics import Metrics
from tests.cgroup_tree import V1_CONTAINER, lay_out
from tests.prometheus_text import sample_value

V1_STAT = "cache 300\nrss 700\nshmem 160\ntotal_inactive_file 100\ntotal_active_file 40\n"


@pytest.mark.parametrize(
    ("files", "proc", "limit", "working_set"),
    [
        # v2 in its own namespace: the container's group at the root
        ({"memory.max": "1073741824\n", "memory.current": "900\n", "memory.stat": "anon 600\ninactive_file 150\nshmem 160\n"},
         "0::/\n", 1073741824, 750),
        ({"memory.max": "max\n", "memory.current": "900\n", "memory.stat": "inactive_file 0\n"}, "0::/\n", None, 900),
        # v2 on a host: the own group
        ({"system.slice/x.service/memory.max": "2000\n", "system.slice/x.service/memory.current": "50\n"},
         "0::/system.slice/x.service\n", 2000, 50),
        # v1 in a container (podman/runc): the host's path in /proc, the container's group at the mount's root
        ({"memory/memory.limit_in_bytes": "1073741824\n", "memory/memory.usage_in_bytes": "1000\n", "memory/memory.stat": V1_STAT},
         V1_CONTAINER, 1073741824, 900),
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "1000\n"}, "4:memory:/\n", None, 1000),
        ({}, "", None, None),
        ({"memory.max": "lots\n", "memory.current": "?\n"}, "0::/\n", None, None),
    ],
)
def test_limit_and_working_set_as_the_kernel_shows_them(
    tmp_path: Path, files: dict[str, str], proc: str, limit: int | None, working_set: int | None
) -> None:
    root, proc_cgroup = lay_out(tmp_path, files, proc)
    assert memory_limit(root, proc_cgroup) == limit
    assert memory_working_set(root, proc_cgroup) == working_set


def test_the_gauges_read_at_each_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import generate_latest

    metrics = Metrics(model="m")
    monkeypatch.setattr("service.metrics.memory_limit", lambda: 2**30)
    monkeypatch.setattr("service.metrics.memory_working_set", lambda: 123)
    text = generate_latest(metrics.registry).decode()
    assert sample_value(text, "ddpm_memory_limit_bytes") == 2**30 and sample_value(text, "ddpm_memory_working_set_bytes") == 123
    monkeypatch.setattr("service.metrics.memory_limit", lambda: None)
    assert math.isnan(sample_value(generate_latest(metrics.registry).decode(), "ddpm_memory_limit_bytes"))
