"""The process's address-space limit (``ulimit -v``, RLIMIT_AS), which torch outgrows long before it uses the memory:
its libraries, their thread-local data and their threads' stacks reserve address space they never touch.

Measured (2-core AMD EPYC, the shipped model, ``ddpm sample -n 1 --steps 1``; stop 75): at 600 MB glibc aborts while
torch loads ("cannot allocate memory for thread-local data: ABORT", exit 127: before Python can say anything); at 650 MB
a MemoryError; at 700 and 900 MB oneDNN's "RuntimeError: could not create a primitive" **as a traceback**; at 800 MB and
from 1 GB up it works. So a command that loads torch says the limit first, where it is under 2 GiB, and a failure under
a limit names it: a memory cgroup (``docker run --memory``, a pod's limit) bounds what is used instead.
"""

from __future__ import annotations

try:
    import resource
except ImportError:  # not a POSIX system (Windows): no such limit, and the client's commands must still load
    resource = None  # type: ignore[assignment]

SMALL_BYTES = 2 * 2**30  # below this, loading torch and running a U-Net may fail (measured above)


def address_space_limit() -> int | None:
    """The soft RLIMIT_AS in bytes, None where there is none."""
    if resource is None:
        return None
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


def limit_said() -> str:
    """The limit as a user set it: "the address-space limit (ulimit -v) of 879 MiB"."""
    limit = address_space_limit()
    return "" if limit is None else f"the address-space limit (ulimit -v) of {limit / 2**20:.0f} MiB"


def small_address_space_warning(command: str) -> str | None:
    """One line before torch is loaded where the limit is under SMALL_BYTES (its abort comes before any message)."""
    limit = address_space_limit()
    if limit is None or limit >= SMALL_BYTES:
        return None
    return (f"ddpm {command}: {limit_said()} is small for torch, which reserves more address space than it uses: under "
            f"{SMALL_BYTES // 2**30} GiB it may abort while loading or fail in a convolution; raise it (ulimit -v unlimited), "
            "or bound the memory used with a cgroup (docker run --memory) instead")  # fmt: skip
