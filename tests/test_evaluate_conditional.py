"""The class-conditional evaluation on real digits, where the answer is known: digits labelled with
their own class agree with it, spread like real ones and sit at real-vs-real distance from their
class; the same digits labelled with another class do not."""

from __future__ import annotations

import pytest
import torch

from ddpm.shipped_models import DEFAULT_CLASSIFIER

pytest.importorskip("scipy")


def test_conditional_evaluation_on_real_digits() -> None:
    from ddpm.classifier import HELD_OUT, load_classifier, mnist_split
    from ddpm.evaluate import evaluate_conditional

    classifier = load_classifier(DEFAULT_CLASSIFIER)
    split = mnist_split()
    assert len(split.test_x) == HELD_OUT and torch.bincount(split.test_y).tolist() == [HELD_OUT // 10] * 10  # the evaluation's bound
    # 50 training digits per class (the evaluation's references are the held-out ones)
    idx = torch.cat([torch.nonzero(split.train_y == c).squeeze(1)[:50] for c in range(10)])
    digits, labels = split.train_x[idx], split.train_y[idx]
    right = evaluate_conditional(classifier, digits, labels)
    wrong = evaluate_conditional(classifier, digits, (labels + 1) % 10)
    assert right["agreement"] > 0.95 and wrong["agreement"] < 0.05
    assert 0.8 < right["diversity"] < 1.25  # as spread out as the held-out digits of the class
    # each class's digits are near that class's real digits (the real-vs-real scale), and far from the next class's
    assert right["per_class_fd"] < 2 * right["per_class_fd_real_vs_real"]
    assert wrong["per_class_fd"] > 3 * right["per_class_fd"]
    assert right["per_class"]["7"]["n"] == 50 and set(right["per_class"]) == {str(c) for c in range(10)}
    assert right["samples"]["n"] == 500  # and the unconditional figures alongside
