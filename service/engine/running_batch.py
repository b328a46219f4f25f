"""The running batch: one row per sample in flight, each at its own position of its own chain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddpm.chain import ChainSpec, ChainTables, StepCoefficients
from service.engine.job import Job


@dataclass
class RunningBatch:
    x: torch.Tensor  # (B, C, H, W)
    positions: torch.Tensor  # (B,) chain position i; the sample is at timestep chain.timesteps[i]
    seeds: torch.Tensor  # (B,) int64 Philox keys
    owners: list[tuple[Job, int]]  # (job, image index k) of each row
    # (B, C, H, W) float32: each row's previous x0_hat, while any row runs a multistep sampler (zeros
    # for the others, whose x0_prev weight is 0); None otherwise, so single-step batches pay nothing
    x0_prev: torch.Tensor | None = None

    def __post_init__(self) -> None:
        multistep = any(job.chain.multistep for job, _ in self.owners)
        if multistep and self.x0_prev is None:
            self.x0_prev = torch.zeros_like(self.x, dtype=torch.float32)
        elif not multistep:
            self.x0_prev = None

    def __len__(self) -> int:
        return len(self.owners)

    def jobs(self) -> list[Job]:
        return [job for job, _ in self.owners]

    def select(self, rows: list[int]) -> RunningBatch | None:
        """The batch of ``rows`` only (None when empty)."""
        if not rows:
            return None
        if len(rows) == len(self.owners):
            return self
        idx = torch.tensor(rows, dtype=torch.long, device=self.x.device)
        x0_prev = None if self.x0_prev is None else self.x0_prev[idx]
        return RunningBatch(self.x[idx], self.positions[idx], self.seeds[idx], [self.owners[r] for r in rows], x0_prev)

    def extend(self, other: RunningBatch) -> RunningBatch:
        """This batch with ``other``'s rows after its own (new samples have no x0_prev yet: zeros)."""
        state = None if self.x0_prev is None else torch.cat([self.x0_prev, torch.zeros_like(other.x, dtype=torch.float32)])
        x, positions = torch.cat([self.x, other.x]), torch.cat([self.positions, other.positions])
        return RunningBatch(x, positions, torch.cat([self.seeds, other.seeds]), self.owners + other.owners, state)

    def stepped(self, new_x: torch.Tensor, x0: torch.Tensor | None) -> RunningBatch:
        """Every row one position on, at ``new_x`` (and each row's x0_hat as the next step's x0_prev)."""
        return RunningBatch(new_x, self.positions - 1, self.seeds, self.owners, x0)

    def step_inputs(self, tables_of: Callable[[ChainSpec], ChainTables]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row timestep t (B,) and step coefficients (8, B), each from its own chain's tables."""
        b, device = len(self.owners), self.x.device
        t = torch.empty(b, dtype=torch.long, device=device)
        coefs = torch.empty((len(StepCoefficients.names()), b), dtype=torch.float32, device=device)
        groups: dict[ChainSpec, list[int]] = {}
        for row, (job, _) in enumerate(self.owners):
            groups.setdefault(job.chain, []).append(row)
        for spec, members in groups.items():
            rows = torch.tensor(members, dtype=torch.long, device=device)
            tables = tables_of(spec)
            t[rows] = tables.timesteps[self.positions[rows]]
            coefs[:, rows] = tables.table[:, self.positions[rows]]
        return t, coefs
