"""Every running chain's coefficient columns in one device table, so that an iteration's per-row inputs
are index gathers by one column index per row, whatever mix of chains the batch holds.

A chain (``ChainSpec``) of K U-Net calls owns K consecutive columns from ``base``: the row at position
p (K-1 down to 0) reads column ``base + p``. A column holds, in one float32 table (``values``, 12 rows),
the eight step coefficients (``StepCoefficients``) and the four editing terms of
``kernels.reverse_step.EditTerms`` (``ddpm.editing.EDIT_ROWS``: known_x, known_z, jump_x, jump_z; their
``EditTerms.IDENTITY`` for a chain that edits nothing), and in one int64 table (``steps``, 2 rows) the original timestep
(the U-Net's input) and the Philox counter of the step's noise: an iteration's inputs are two gathers. On the host, one flag per column
says whether the step jumps back up (restart, RePaint), so whether an iteration needs the editing terms
is known without reading the device.

Columns are appended as new chains arrive; when the table would pass ``max_columns``, it is rebuilt
with the chains still in use only (``compact``), and their bases change: the running batch recomputes
its rows' columns (``RunningBatch.rebase``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ddpm.chain import ChainSpec, ChainTables
from ddpm.editing import EDIT_ROW, EDIT_ROWS
from kernels.reverse_step import EditTerms, StepCoefficients

COEFS = len(StepCoefficients.names())  # values[:COEFS]: the step's coefficients; values[COEFS:]: the editing terms
MAX_COLUMNS = 1 << 20  # 8 + 4 float32 and 2 int64 per column: 64 MB at most on the device


@dataclass
class ChainSlot:
    spec: ChainSpec
    base: int  # the column of position 0
    calls: int  # K: the chain's U-Net calls (its columns)
    tables: ChainTables
    multistep: bool  # the sampler carries x0_prev from step to step


class ChainTableStore:
    def __init__(
        self,
        tables_of: Callable[[ChainSpec], ChainTables],
        device: torch.device,
        initial_columns: int = 4096,
        max_columns: int = MAX_COLUMNS,
    ) -> None:
        self.tables_of, self.device, self.max_columns = tables_of, device, max_columns
        self.slots: collections.OrderedDict[ChainSpec, ChainSlot] = collections.OrderedDict()
        self.used = 0
        self.generation = 0  # +1 at each compaction: the slots' bases changed
        self._allocate(initial_columns)

    def _allocate(self, columns: int) -> None:
        self.capacity = columns
        neutral = torch.tensor([0.0] * COEFS + [EditTerms.IDENTITY[name] for name in EDIT_ROWS], dtype=torch.float32)
        self.values = neutral[:, None].repeat(1, columns).to(self.device)  # (12, columns)
        self.steps = torch.zeros((2, columns), dtype=torch.long, device=self.device)  # timestep, counter
        self.jumps = np.zeros(columns, dtype=bool)  # host: the column's step jumps back up

    def slot(self, spec: ChainSpec, in_use: Callable[[], Iterable[ChainSpec]] = tuple) -> ChainSlot:
        """The columns of ``spec``, appended on first use. ``in_use``: the chains of the running rows,
        kept when the table is compacted to make room."""
        slot = self.slots.get(spec)
        if slot is not None:
            self.slots.move_to_end(spec)
            return slot
        tables = self.tables_of(spec)
        calls = tables.num_steps
        if self.used + calls > self.capacity:
            self._make_room(calls, set(in_use()))
        slot = ChainSlot(spec, self.used, calls, tables, spec.multistep)
        self._write(slot)
        self.slots[spec] = slot
        self.used += calls
        return slot

    def _write(self, slot: ChainSlot) -> None:
        cols = slice(slot.base, slot.base + slot.calls)
        tables = slot.tables
        self.values[:COEFS, cols] = tables.table
        self.steps[0, cols] = tables.timesteps
        self.steps[1, cols] = tables.counters
        if tables.edit_table is not None:
            self.values[COEFS:, cols] = tables.edit_table
            edit32 = tables.edit_table64.astype(np.float32)  # the values the kernel compares, as it does
            self.jumps[cols] = (edit32[EDIT_ROW["jump_x"]] != 1.0) | (edit32[EDIT_ROW["jump_z"]] != 0.0)
        else:
            self.values[COEFS:, cols] = torch.tensor([EditTerms.IDENTITY[name] for name in EDIT_ROWS], device=self.device)[:, None]
            self.jumps[cols] = False

    def _make_room(self, calls: int, keep: set[ChainSpec]) -> None:
        """Grow (doubling, up to max_columns), or rebuild with the chains in ``keep`` only."""
        live = [slot for spec, slot in self.slots.items() if spec in keep]
        needed = sum(slot.calls for slot in live) + calls
        columns = self.capacity
        while columns < self.used + calls and columns < self.max_columns:
            columns *= 2
        if columns >= self.used + calls:  # room by growing: the bases stay
            old = (self.values, self.steps, self.jumps)
            self._allocate(columns)
            self.values[:, : self.used] = old[0][:, : self.used]
            self.steps[:, : self.used] = old[1][:, : self.used]
            self.jumps[: self.used] = old[2][: self.used]
            return
        self.generation += 1
        self._allocate(max(self.capacity, needed))
        self.slots = collections.OrderedDict()
        self.used = 0
        for slot in live:  # rewritten from the front: new bases
            slot.base = self.used
            self._write(slot)
            self.slots[slot.spec] = slot
            self.used += slot.calls
