"""The coefficient tables of the chains requests ask for, built once and kept (least recently used out)."""

from __future__ import annotations

import collections

import torch

from ddpm.chain import ChainSpec, ChainTables
from ddpm.schedule import NoiseSchedule, VarianceType

CHAIN_CACHE = 256  # coefficient tables kept (8 x S float32 each; at most 32 KB at S = 1000)


class ChainTablesCache:
    def __init__(self, schedule: NoiseSchedule, variance_type: VarianceType, device: torch.device, size: int = CHAIN_CACHE) -> None:
        self.schedule, self.variance_type, self.device, self.size = schedule, variance_type, device, size
        self._tables: collections.OrderedDict[ChainSpec, ChainTables] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._tables)

    def __call__(self, spec: ChainSpec) -> ChainTables:
        """The tables of one chain; a chain the schedule cannot make (steps outside 1..T, an offset past T) raises ValueError."""
        tables = self._tables.get(spec)
        if tables is None:
            tables = ChainTables.for_spec(self.schedule, self.variance_type, spec, self.device)
            self._tables[spec] = tables
            while len(self._tables) > self.size:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(spec)
        return tables
