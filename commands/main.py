"""The ``ddpm`` command root: one parser over the core's commands (train, sample, eval,
train-classifier, info) and the service's (serve, generate, compile-cache).

It sits above both packages (the core imports nothing of the service); building the parser imports
no torch, so ``ddpm --help`` and ``ddpm --version`` answer at once (tests/test_package_structure.py).
"""

from __future__ import annotations

import argparse
import sys

from commands.address_space import address_space_limit, limit_said, small_address_space_warning
from commands.inductor_cache_dir import refuse_an_inductor_cache_that_cannot_be_made
from commands.inherited_signals import unblock_stop_signals
from commands.model_commands import add_model_commands
from commands.process_exit import exit_at_once
from commands.serving_commands import add_serving_commands
from commands.standard_streams import open_closed_streams, quiet_on_closed_stdout, stdout_reader_gone
from commands.working_directory import refuse_a_removed_working_directory
from ddpm import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="DDPM (Ho et al. 2020): train, sample, evaluate, serve")
    parser.add_argument("--version", action="version", version=f"ddpm-serve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_commands(sub)
    add_serving_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    open_closed_streams()
    unblock_stop_signals()
    try:
        code = run(build_parser().parse_args(argv))
        sys.stdout.flush()  # here, not at exit: a reader that went away is told below, not by "Exception ignored"
        return code
    except BrokenPipeError:
        if not stdout_reader_gone():  # a socket's (ddpm generate's server went away): the command's own error
            raise
        return quiet_on_closed_stdout()


def run(args: argparse.Namespace) -> int:
    refuse_a_removed_working_directory(args.command)
    if args.command != "generate" and (warning := small_address_space_warning(args.command)):  # the client loads no torch
        print(warning, file=sys.stderr, flush=True)
    if getattr(args, "compiles", True):  # not the client's, nor compile-cache's (a folder of its own)
        refuse_an_inductor_cache_that_cannot_be_made(args.command)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from wherever the work was (torch, inductor, httpx)
        exit_at_once(f"\nddpm {args.command}: interrupted", code=130)
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if limit_said():  # not the machine's memory: the address space the process may reserve
            raise SystemExit(f"ddpm {args.command}: out of memory ({first}) under {limit_said()}: raise it (ulimit -v "
                             "unlimited), or bound the memory used with a cgroup (docker run --memory) instead") from exc  # fmt: skip
        hint = " (a smaller --batch-size)" if hasattr(args, "batch_size") else ""
        raise SystemExit(f"ddpm {args.command}: out of memory ({first}): ask for less at once{hint} or use a larger machine") from exc


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: numpy's (a MemoryError), torch's on the CPU (a RuntimeError from its allocator) or on a
    GPU (torch.OutOfMemoryError), told apart without importing torch; under an address-space limit, oneDNN's "could not
    create a primitive" too (its scratch memory refused: commands/address_space.py)."""
    primitive = "could not create a primitive" in str(exc) and address_space_limit() is not None
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(exc) or primitive


if __name__ == "__main__":
    sys.exit(main())
