"""One iteration of the reverse chain over a running batch (``ddpm.running_batch``), in three stages that
the engine runs with a fault boundary around each and the offline sampler runs back to back:

- rows join: x_T ~ N(0, I) from each image's own Philox key (counter 0), or for SDEdit the input noised
  to the chain's first level (Ho et al. Eq. 4 at t0, with x_T's z);
- **eps**: ONE eps_theta call over the rows that advance, with per-row t (classifier-free guidance in the
  same call: a guided row adds a null-label row, ``ddpm.guidance``);
- **step**: ONE fused step (``kernels.reverse_step``) with per-row coefficients, Philox keys and counters,
  every sampler, clip setting, chain and edit at once; the batch then advances.

This is the only implementation of the chain's iteration: ``ddpm sample`` / ``ddpm eval`` (through
``ddpm.offline_sampler``) and the server compute an image the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ddpm.chain import EpsModel, StepFn
from ddpm.guidance import guided_eps
from ddpm.running_batch import Owner, RunningBatch, StepInputs, host_to_device, tensor_to_device
from kernels.reverse_step import StepCoefficients


class HasEps(Protocol):
    eps_model: EpsModel


class DenoisingIteration:
    """``model``: anything with ``eps_model``, read at every call (a ``LoadedModel``, whose eps_theta the server
    swaps for the compiled one when its graphs are ready). The shape, device, chain tables and null label are
    the batch's."""

    def __init__(self, model: HasEps, step_fn: StepFn) -> None:
        self.model, self.step_fn = model, step_fn
        self.faults: Callable[[str], None] = lambda stage: None  # the engine's fault injection (service.fault_injection)

    def start_x(self, batch: RunningBatch, owners: list[Owner], seeds: torch.Tensor) -> torch.Tensor:
        """The state new rows join at (k, C, H, W): x_T from each key (``seeds``, on the device), or SDEdit's start."""
        x_T = self.draw_x_T(seeds, batch.shape)
        requests = [batch.request_of(owner) for owner, _ in owners]
        sdedit = [row for row, request in enumerate(requests) if request.chain.strength < 1.0 and request.edit is not None]
        if sdedit:  # SDEdit: Eq. 4 at t0, with x_T's z
            tables = [batch.store.tables_of(requests[row].chain) for row in sdedit]
            device = batch.device
            idx = host_to_device(sdedit, device, torch.int64)
            broadcast = (-1, *([1] * len(batch.shape)))
            start_x = host_to_device([t.start_x for t in tables], device, torch.float32).view(broadcast)
            start_z = host_to_device([t.start_z for t in tables], device, torch.float32).view(broadcast)
            init = tensor_to_device(torch.stack([requests[row].edit.image for row in sdedit]), device)  # type: ignore[union-attr]
            x_T[idx] = start_x * init + start_z * x_T[idx]
        return x_T

    def draw_x_T(self, seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """x_T ~ N(0, I) of each new image from its own key at counter 0 (N, C, H, W): the fused step with
        every coefficient 0 but sigma = 1 draws exactly z, in one launch (the Triton kernel on CUDA, the
        compiled twin on a compiling CPU) instead of the Philox twin's ~30 operations
        (``kernels.philox.sample_noise``, which it equals: 0 + 1 z = z)."""
        k, device = seeds.shape[0], seeds.device
        zeros = torch.zeros((k, *shape), dtype=torch.float32, device=device)
        coefs = torch.zeros((len(StepCoefficients.names()), k), dtype=torch.float32, device=device)
        coefs[StepCoefficients.names().index("sigma")] = 1.0
        counters = torch.zeros(k, dtype=torch.int64, device=device)
        x_T, _ = self.step_fn(zeros, zeros, StepCoefficients.from_stacked(coefs), seeds, counters, None)
        return x_T

    def eps(self, batch: RunningBatch, m: int | None = None) -> tuple[StepInputs, torch.Tensor]:
        """Per-row t, noise counter and step coefficients (gathers by each row's column in the chain
        table), and ONE eps_theta call over the rows that advance."""
        m = batch.n if m is None else m
        inputs = batch.step_inputs(m)
        x = batch.x[:m]
        self.faults("unet")
        if inputs.labels is None or inputs.scales is None:
            return inputs, self.model.eps_model(x, inputs.t)
        # classifier-free guidance in the same call: guided rows add a null-label row (ddpm/guidance.py);
        # the scales are on the host, so finding the guided rows reads nothing back from the device
        return inputs, guided_eps(self.model.eps_model, x, inputs.t, inputs.labels, inputs.scales, batch.null_label)  # type: ignore[arg-type]

    def step(self, batch: RunningBatch, m: int, inputs: StepInputs, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ONE fused step over the rows that advance, every sampler, clip setting, chain and edit at once;
        returns x_prev and (while any row runs a multistep sampler) every row's x0_hat."""
        self.faults("step")
        x, seeds = batch.x[:m], batch.seeds[:m]
        if inputs.edit is None:  # the signature every step function has
            return self.step_fn(x, eps, inputs.coefs, seeds, inputs.counters, inputs.x0_prev)
        return self.step_fn(x, eps, inputs.coefs, seeds, inputs.counters, inputs.x0_prev, inputs.edit)
