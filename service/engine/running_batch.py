"""The running batch: one row per sample in flight, each at its own position of its own chain."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddpm.chain import ChainSpec, ChainTables, StepCoefficients
from kernels.reverse_step import EditTerms
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
    # (B, C, H, W) float32 each: RePaint's input image and mask per row, while any row inpaints (zeros for
    # the others, which the step never reads); None otherwise, so batches without editing pay nothing
    known: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        multistep = any(job.chain.multistep for job, _ in self.owners)
        if multistep and self.x0_prev is None:
            self.x0_prev = torch.zeros_like(self.x, dtype=torch.float32)
        elif not multistep:
            self.x0_prev = None
        if not any(job.mask is not None for job, _ in self.owners):
            self.known = self.mask = None
        elif self.known is None or self.mask is None:
            self.known, self.mask = self._edit_inputs(self.owners)

    def _edit_inputs(self, owners: list[tuple[Job, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(self.x.shape[1:], dtype=torch.float32)
        known = [job.init_image if job.mask is not None and job.init_image is not None else zeros for job, _ in owners]
        mask = [job.mask if job.mask is not None else zeros for job, _ in owners]
        return torch.stack(known).to(self.x.device), torch.stack(mask).to(self.x.device)

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
        known, mask = (None, None) if self.known is None or self.mask is None else (self.known[idx], self.mask[idx])
        return RunningBatch(self.x[idx], self.positions[idx], self.seeds[idx], [self.owners[r] for r in rows], x0_prev, known, mask)

    def extend(self, other: RunningBatch) -> RunningBatch:
        """This batch with ``other``'s rows after its own (new samples have no x0_prev yet: zeros)."""
        state = None if self.x0_prev is None else torch.cat([self.x0_prev, torch.zeros_like(other.x, dtype=torch.float32)])
        x, positions = torch.cat([self.x, other.x]), torch.cat([self.positions, other.positions])
        edit: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # rebuilt from the owners unless both carry it
        if self.known is not None and other.known is not None and self.mask is not None and other.mask is not None:
            edit = (torch.cat([self.known, other.known]), torch.cat([self.mask, other.mask]))
        return RunningBatch(x, positions, torch.cat([self.seeds, other.seeds]), self.owners + other.owners, state, *edit)

    def stepped(self, new_x: torch.Tensor, x0: torch.Tensor | None) -> RunningBatch:
        """Every row one position on, at ``new_x`` (and each row's x0_hat as the next step's x0_prev)."""
        return RunningBatch(new_x, self.positions - 1, self.seeds, self.owners, x0, self.known, self.mask)

    def step_inputs(self, tables_of: Callable[[ChainSpec], ChainTables]) -> StepInputs:
        """Per-row timestep, noise counter and step coefficients, each from its own chain's tables (and
        the editing terms, while any row inpaints)."""
        b, device = len(self.owners), self.x.device
        t = torch.empty(b, dtype=torch.long, device=device)
        counters = torch.empty(b, dtype=torch.long, device=device)
        coefs = torch.empty((len(StepCoefficients.names()), b), dtype=torch.float32, device=device)
        edit_rows = None  # EditTerms.ROWS, made when a row's chain has editing terms (RePaint, restart)
        groups: dict[ChainSpec, list[int]] = {}
        for row, (job, _) in enumerate(self.owners):
            groups.setdefault(job.chain, []).append(row)
        for spec, members in groups.items():
            rows = torch.tensor(members, dtype=torch.long, device=device)
            tables, at = tables_of(spec), self.positions[rows]
            t[rows], counters[rows] = tables.timesteps[at], tables.counters[at]
            coefs[:, rows] = tables.table[:, at]
            if tables.edit_table is not None:  # RePaint's blend and jumps, restart's jump
                if edit_rows is None:
                    edit_rows = torch.tensor([[0.0], [0.0], [0.0], [1.0], [0.0]], device=device).repeat(1, b)  # nothing
                edit_rows[0, rows] = 1.0 if spec.repaint else 0.0  # a RePaint chain's rows carry a mask
                edit_rows[1:, rows] = tables.edit_table[:, at]
        edit = None
        if edit_rows is not None:  # without a mask in the batch (restart alone), x stands in: no row reads it
            masked = self.known is not None and self.mask is not None
            edit = EditTerms(self.known if masked else self.x, self.mask if masked else self.x, *edit_rows.unbind(0))
            if not masked and not bool(edit.edits().any()):  # no row jumps this iteration (on CUDA: one flag read back)
                edit = None
        return StepInputs(t, counters, coefs, edit)


@dataclass
class StepInputs:
    """What one iteration's U-Net call and fused step read, per row."""

    t: torch.Tensor  # (B,) the original timestep (the U-Net's input)
    counters: torch.Tensor  # (B,) the Philox counter of the step's noise
    coefs: torch.Tensor  # (8, B) StepCoefficients, stacked
    edit: EditTerms | None  # RePaint's terms, while any row inpaints
