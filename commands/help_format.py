"""The help format of every ``ddpm`` subcommand: each flag's help ends with its default."""

from __future__ import annotations

import argparse
from typing import Any


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ``(default: X)`` suffix, except where the help already says its default (in words,
    or pydantic-settings' own suffix) or there is none to show (None, a store_true flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def subcommand(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows every flag's default."""
    return sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)
