"""A job's partial images as the streams waiting on it read them (service/api/preview_log.py): each reader gets those of
its own images, each once; a reader that joins later starts from each image's newest; what every reader has read is
let go (a job's previews were held until it ended once a sharer could read them)."""

from __future__ import annotations

import gc

import torch

from service.api.preview_log import PreviewLog


def _preview(k: int, index: int) -> tuple[int, int, torch.Tensor]:
    return k, index, torch.full((1, 2, 2), float(10 * k + index))


def _seen(taken: list) -> list[tuple[int, int, float]]:
    return [(k, index, float(image[0, 0, 0])) for k, index, image in taken]


def test_each_reader_gets_its_own_images_each_once_and_a_late_one_starts_from_the_newest() -> None:
    log = PreviewLog()
    whole, part, none = log.reader(0, 3), log.reader(1, 1), log.reader(0, 0)  # the job's 3 images; image 1 alone; none
    for k in range(3):
        log.add(_preview(k, 0))
    assert _seen(whole.take()) == [(0, 0, 0.0), (1, 0, 10.0), (2, 0, 20.0)] and whole.take() == []
    assert _seen(part.take()) == [(0, 0, 10.0)]  # image 1 of the job is image 0 of the part
    assert none.take() == []
    log.add(_preview(1, 1))
    late = log.reader(0, 3)  # a retry that shares the job now: each image's newest, then what comes
    log.add(_preview(0, 1))
    assert _seen(late.take()) == [(0, 0, 0.0), (2, 0, 20.0), (1, 1, 11.0), (0, 1, 1.0)]
    assert _seen(whole.take()) == [(1, 1, 11.0), (0, 1, 1.0)] and _seen(part.take()) == [(0, 1, 11.0)]


def test_what_every_reader_has_read_is_let_go() -> None:
    log = PreviewLog()
    fast, slow = log.reader(0, 4), log.reader(0, 4)
    for index in range(3):
        for k in range(4):
            log.add(_preview(k, index))
        fast.take()
    assert len(log.since(slow.read)) == 12  # the slow reader's unread: kept for it
    assert len(slow.take()) == 12 and log.since(log.made) == [] and log.held == 0
    del fast, slow
    gc.collect()
    for k in range(4):  # no reader left (the streams ended): only each image's newest stays, for one that joins
        log.add(_preview(k, 3))
    assert log.held == 0 and _seen(log.reader(0, 4).take()) == [(k, 3, 10.0 * k + 3) for k in range(4)]
