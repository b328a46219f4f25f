"""The models this project ships in ``models/`` (each produced by its own training command, with a
model card): the served default and the digit classifier whose features the evaluation uses."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = MODELS_DIR / "mnist-28"
DEFAULT_CLASSIFIER = MODELS_DIR / "digit-classifier"
