"""The persistent running batch: rows leave by moving the last rows into their places with everything
they carry, and the chain table compacts while rows run without moving any row off its chain."""

from __future__ import annotations

import time

import numpy as np
import torch

from ddpm.chain import ChainSpec
from ddpm.chain_table_store import ChainTableStore
from ddpm.chain_tables_cache import ChainTablesCache
from ddpm.image_request import ImageRequest
from ddpm.offline_sampler import sample
from ddpm.seeding import image_seeds
from kernels.philox import seeds_to_tensor
from service.engine.engine import Engine
from service.engine.job import Job
from service.engine.served_batch import ServedBatch
from tests.batch_rounding import BATCH_ROUNDING
from tests.engine_jobs import wait_done
from tests.tiny_model import random_tiny_unet, tiny_loaded_model


def _batch(capacity: int = 8) -> tuple[ServedBatch, ChainTablesCache]:
    model = tiny_loaded_model(random_tiny_unet())
    tables = ChainTablesCache(model.schedule, model.variance_type, torch.device("cpu"))
    return ServedBatch(capacity, (1, 8, 8), ChainTableStore(tables, torch.device("cpu")), torch.device("cpu")), tables


def test_rows_leave_by_index_and_the_last_rows_move_with_their_state() -> None:
    batch, _ = _batch()
    jobs = [Job(ImageRequest(i, 1, ChainSpec(5 + i, "dpmsolver++" if i % 2 else "ddpm")), timeout_s=9) for i in range(6)]
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 8, 8).clone()
    batch.add([(job, 0) for job in jobs], x, torch.arange(100, 106), clock=3)
    assert batch.n == 6 and batch.multistep_rows == 3 and batch.x0_prev is not None
    before = {job.id: (batch.cols_host[r], batch.pos_host[r]) for r, (job, _) in enumerate(batch.owners)}
    batch.remove([1, 4])  # rows 4 and 5 were last: 5 moves into 1, 4 leaves
    assert batch.n == 4 and batch.multistep_rows == 2  # the odd jobs are multistep: 3 and 5 stay
    assert [job.seed for job, _ in batch.owners] == [0, 5, 2, 3]
    assert batch.x[:4, 0, 0, 0].tolist() == [0.0, 5.0, 2.0, 3.0] and batch.seeds[:4].tolist() == [100, 105, 102, 103]
    for r, (job, _) in enumerate(batch.owners):
        assert (batch.cols_host[r], batch.pos_host[r]) == before[job.id]
        assert batch.multistep_host[r] == job.chain.multistep


def test_the_chosen_rows_move_to_the_front_with_their_state_and_the_rest_keep_theirs() -> None:
    batch, _ = _batch()
    jobs = [Job(ImageRequest(i, 1, ChainSpec(5 + i, "ddpm")), timeout_s=9) for i in range(7)]
    x = torch.arange(7, dtype=torch.float32).view(7, 1, 1, 1).expand(7, 1, 8, 8).clone()
    batch.add([(job, 0) for job in jobs], x, torch.arange(100, 107), clock=3)
    state = {job.seed: (batch.cols_host[r], batch.pos_host[r]) for r, (job, _) in enumerate(batch.owners)}
    batch.move_to_front(np.array([5, 1, 6, 0, 2, 3, 4]), 3)  # rows 5, 1 and 6 advance: 5 and 6 swap with 0 and 2
    seeds = [job.seed for job, _ in batch.owners]
    assert sorted(seeds[:3]) == [1, 5, 6] and seeds[1] == 1 and sorted(seeds) == list(range(7))  # row 1 stays put
    assert batch.x[:7, 0, 0, 0].tolist() == [float(s) for s in seeds] and batch.seeds[:7].tolist() == [100 + s for s in seeds]
    assert all((batch.cols_host[r], batch.pos_host[r]) == state[s] for r, s in enumerate(seeds))
    batch.move_to_front(np.array([2, 0, 1]), 3)  # already in front: nothing moves
    assert [job.seed for job, _ in batch.owners] == seeds


def test_the_inputs_are_each_rows_own_chain_column() -> None:
    batch, tables = _batch()
    specs = [ChainSpec(7, "ddpm"), ChainSpec(4, "ddim", spacing="trailing"), ChainSpec(10, "restart", spacing="trailing")]
    jobs = [Job(ImageRequest(i, 1, spec), timeout_s=9) for i, spec in enumerate(specs)]
    batch.add([(job, 0) for job in jobs], torch.zeros(3, 1, 8, 8), torch.arange(3), clock=0)
    for _ in range(3):
        inputs = batch.step_inputs()
        for r, spec in enumerate(specs):
            own, position = tables(spec), int(batch.pos_host[r])
            assert inputs.t[r] == own.timesteps[position] and inputs.counters[r] == own.counters[position]
            assert torch.equal(inputs.coefs.stacked()[:, r], own.table[:, position])
        batch.advance(torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 8, 8))


def test_a_compaction_while_rows_run_changes_no_image() -> None:
    """A chain table of 64 columns at most: every new chain compacts it while others run; each image is
    still its offline chain's."""
    unet = random_tiny_unet()
    model = tiny_loaded_model(unet)
    engine = Engine(model, max_batch=4)
    engine._batch.store.max_columns = engine._batch.store.capacity = 64
    engine._batch.store._allocate(64)
    specs = [ChainSpec(30, "ddpm"), ChainSpec(20, "ddim", spacing="trailing"), ChainSpec(25, "dpmsolver++"),
             ChainSpec(12, "ddpm", clip=False)]  # fmt: skip
    jobs = [Job(ImageRequest(40 + i, 2, spec), timeout_s=60) for i, spec in enumerate(specs)]
    engine.start()
    try:
        for job in jobs:
            engine.submit(job)
            time.sleep(0.02)
        wait_done(*jobs)
    finally:
        engine.stop()
    assert engine._batch.store.generation > 0  # it did compact
    with torch.inference_mode():
        for job, spec in zip(jobs, specs, strict=True):
            assert job.error is None and job.images is not None
            offline = sample(unet, model.schedule, seeds_to_tensor(image_seeds(job.seed, 2)), (1, 8, 8), steps=spec.steps,
                             sampler=spec.sampler, spacing=spec.spacing, clip_denoised=spec.clip)  # fmt: skip
            scale = max(1.0, offline.abs().max().item())
            assert (job.images - offline).abs().max().item() / scale < BATCH_ROUNDING, spec
    assert np.all(engine._batch.cols_host[: engine._batch.n] >= 0)
