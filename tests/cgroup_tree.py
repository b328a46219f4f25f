"""A cgroup file system and a /proc/self/cgroup laid out in a test's directory, as a kernel shows them to a process
(ddpm/cgroup.py reads them: tests/test_cpu_quota.py, tests/test_container_memory.py)."""

from __future__ import annotations

from pathlib import Path

# runc's v1 container: /proc names the host's groups, the container's own is mounted at the root of each controller
V1_CONTAINER = "4:memory:/libpod_parent/libpod-ab12\n3:cpuset:/libpod_parent/libpod-ab12\n1:cpu:/libpod_parent/libpod-ab12\n" \
               "0::/libpod_parent/libpod-ab12\n"  # fmt: skip


def lay_out(root: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    """``files`` (paths under the cgroup mount -> text) and ``proc`` (the /proc/self/cgroup text): (mount, proc file)."""
    for name, text in files.items():
        (root / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "fs" / name).write_text(text)
    (root / "cgroup").write_text(proc)
    return root / "fs", root / "cgroup"
