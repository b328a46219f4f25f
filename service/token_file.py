"""``DDPM_API_TOKEN_FILE`` as the server and the client read it: one token per line (a rotation holds the old and the
new), blank lines and surrounding whitespace (an editor's CR) dropped. The server accepts every token; the client sends
the last, the newest."""

from __future__ import annotations

from pathlib import Path


def token_lines(path: Path) -> list[str]:
    """The file's tokens in order; ValueError naming the file where it cannot be read (missing, not text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read DDPM_API_TOKEN_FILE {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]
