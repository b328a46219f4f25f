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

# `python -c WITHOUT_TORCH ARGV`: ``ddpm ARGV`` in a fresh process, exit 3 where it imported torch (~2.5 s of a 2-core
# EPYC's start): for what needs no torch (``ddpm generate``, a client; ``ddpm serve``'s refusal of a bad setting)
WITHOUT_TORCH = "import sys; from commands.main import main; code = main(sys.argv[1:]); sys.exit(3 if 'torch' in sys.modules else code)"


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
