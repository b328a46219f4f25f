"""The cgroup's CPU quota (ddpm/cpu_quota.py) read from cgroup trees laid out as v1 and v2 hosts and containers show
them; the server's default thread count capped by it. The real cgroup of a container: tests/test_container.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpm.cpu_quota import cpu_quota, threads_within_quota
from tests.cgroup_tree import V1_CONTAINER, lay_out


@pytest.mark.parametrize(
    ("files", "proc", "quota"),
    [
        # v2 with its own namespace (Docker, Kubernetes): the process sits at the root, which is the container's
        ({"cpu.max": "150000 100000\n"}, "0::/\n", 1.5),
        ({"cpu.max": "max 100000\n"}, "0::/\n", None),
        # v2 on a host: the process's own group, a systemd slice
        ({"user.slice/app.scope/cpu.max": "200000 100000\n", "cpu.max": "max 100000\n"}, "0::/user.slice/app.scope\n", 2.0),
        # v1 in a container (podman/runc, this project's CI): the host's path in /proc, the container's group mounted at the root
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, V1_CONTAINER, 1.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, "2:cpu,cpuacct:/\n", 0.5),
        # v1 on a host: the own path wins over the root's (unlimited) files
        ({"cpu/kubepods/pod1/c1/cpu.cfs_quota_us": "400000", "cpu/kubepods/pod1/c1/cpu.cfs_period_us": "100000",
          "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, "1:cpu:/kubepods/pod1/c1\n", 4.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "1:cpu:/\n", None),
        # nothing readable, or what this does not understand: no cap
        ({}, "", None),
        ({"cpu.max": "lots\n"}, "0::/\n", None),
        ({"cpu.max": "100000 0\n"}, "0::/\n", None),
    ],
)
def test_the_quota_as_the_kernel_shows_it(tmp_path: Path, files: dict[str, str], proc: str, quota: float | None) -> None:
    root, proc_cgroup = lay_out(tmp_path, files, proc)
    assert cpu_quota(root, proc_cgroup) == quota


def test_threads_are_pytorchs_default_capped_at_whole_cpus_of_the_quota() -> None:
    assert threads_within_quota(64, 2.0) == 2  # a 64-core host, a 2-CPU limit
    assert threads_within_quota(2, 1.5) == 1  # rounded down: 2 threads on 1.5 CPUs are throttled for a quarter of each period
    assert threads_within_quota(4, 0.5) == 1  # at least one
    assert threads_within_quota(4, 16.0) == 4  # the quota never raises it
    assert threads_within_quota(8, None) == 8


def test_the_server_caps_its_threads_at_the_quota(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from ddpm import cpu_quota as module
    from service import server_state
    from service.settings import Settings

    monkeypatch.setattr(module, "cpu_quota", lambda: 1.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    chosen: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    with caplog.at_level("INFO", logger="ddpm.server"):
        server_state.ServerState(Settings(threads=0))._set_threads()
    assert chosen == [1] and "the cgroup's CPU quota (1.00 CPUs; PyTorch's default was 8); DDPM_THREADS sets it" in caplog.text
    chosen.clear()
    server_state.ServerState(Settings(threads=3))._set_threads()
    assert chosen == [3]  # the setting wins over the quota
    chosen.clear()
    monkeypatch.setattr(module, "cpu_quota", lambda: None)
    assert module.set_torch_threads(0) is None and chosen == []  # no quota: PyTorch's default, untouched


def test_the_commands_cap_their_threads_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``ddpm train`` (and distill, sample, eval) with --threads 0, their default."""
    from ddpm import cpu_quota as module
    from ddpm.train import TrainConfig, Trainer
    from ddpm.unet import UNetConfig

    monkeypatch.setattr(module, "cpu_quota", lambda: 2.5)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    chosen: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    config = TrainConfig(unet=UNetConfig(base_channels=8, channel_mult=(1,), attn_resolutions=()), steps=1)
    trainer = Trainer(config, tmp_path / "run", device="cpu")
    assert chosen == [2] and trainer.threads_note is not None and "(2.50 CPUs; PyTorch's default was 16)" in trainer.threads_note
