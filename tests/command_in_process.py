"""``ddpm ARGV`` run in the test's own process, for the commands' refusals: what a fresh process would print and
exit with, without its ~3 s of importing torch again (2-core EPYC; ~20 refusals in ``tests/test_cli.py``).

A refusal is ``SystemExit``: a message (Python prints it, exit 1) or a code. Anything else escaping the command
would be the traceback a user must never see, and fails the test that ran it. What a command may change in the
process for the rest of its life (torch's thread count and random state, the environment, the root logger) is
put back after it, so the tests after it on the same worker see what they would have seen. The real process's own
behaviour (the exit after a Ctrl-C, an abort at exit) stays with the tests that start one."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass

import torch


def fresh_process_without(roots: tuple[str, ...]) -> str:
    """``python -c <this> ARGV``: ``ddpm ARGV`` in a fresh process, its own exit code (a ``SystemExit`` message printed
    as the interpreter does), or 3, naming them, where it imported any module of ``roots``."""
    return (
        "import sys\nfrom commands.main import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit_:\n    code = exit_.code\n"
        "    if isinstance(code, str):\n        print(code, file=sys.stderr)\n        code = 1\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {roots!r})\n"
        "if heavy:\n    print('imported', heavy[:5], file=sys.stderr)\n"
        "sys.exit(3 if heavy else code)\n"
    )


# for what needs no torch (~2.5 s of a 2-core EPYC's start): ``ddpm generate``, a client; ``ddpm serve``'s refusals
WITHOUT_TORCH = fresh_process_without(("torch",))


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


def run_command(argv: list[str]) -> Ran:
    from commands.main import main

    out, err = io.StringIO(), io.StringIO()
    environ, threads, rng = dict(os.environ), torch.get_num_threads(), torch.random.get_rng_state()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: object = main(argv)
            except SystemExit as exit_:
                code = exit_.code
        if isinstance(code, str):  # as the interpreter does with a SystemExit's message
            err.write(code + "\n")
            code = 1
        return Ran(int(code or 0), out.getvalue(), err.getvalue())  # type: ignore[call-overload]
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
        root.handlers[:], root.level = handlers, level
