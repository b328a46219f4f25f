"""The fused reverse step with in-kernel noise: one affine update serves every sampler in a mixed batch.

For each sample i, with its own per-step coefficients (``StepCoefficients``, one column per sample):

    x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps        (Ho et al. Eq. 15 solved for x_0),
             clipped to [-1, 1] where the sample's ``clip`` is 1
    x_prev = a x_t + d eps + b x0_hat + c x0_prev + sigma z

which is, with the coefficients ``ddpm.samplers`` derives from the papers' equations:
- DDPM, Algorithm 2: Eq. 11 (a = 1/sqrt(alpha_t), d = -beta_t / (sqrt(alpha_t) sqrt(1 - abar_t))) or,
  clipped, the posterior mean of Eq. 7 (a = coef2, b = coef1);
- DDIM (Song et al. 2021, Eq. 12): b = sqrt(abar_prev), d = sqrt(1 - abar_prev - sigma^2);
- DPM-Solver++(2M) (Lu et al. 2022): a = sigma_next/sigma_t, b and c the multistep weights of this
  step's and the previous step's data predictions (x0_prev: the multistep state each sample carries).

z is drawn in registers by ``tl.randn`` at offset ``(noise_counter[i] << 32) | e`` for the sample's
logical NCHW element e, keyed by the sample's own Philox key ``seeds[i]``: it never touches memory and
depends on (seed, counter, e) only, never on the batch.

Multistep mode (``x0_prev`` given): the kernel also reads x0_prev and writes x0_hat, the state of the
next step; without it, it reads x_t and eps and writes x_prev only (3 passes over the batch).

Editing (``edit``, an :class:`EditTerms`, given when some row of the batch edits an image): RePaint's
known-region replacement (Lugmayr et al. 2022, Alg. 1 line 5-8 / Eq. 8a-8c) and the forward jump back
up of its resampling (Alg. 1 line 10), folded into the same update. With m the mask (1: a known pixel),
x_known the input image, and u = (jump_x, jump_z) the jump q(x_up | x_prev) = N(jump_x x_prev, jump_z^2):

    x_prev = jump_x [ (1 - m) mean + m known_x x_known ] + sqrt( (jump_x ((1 - m) sigma + m known_z))^2 + jump_z^2 ) z

where mean = a x_t + d eps + b x0_hat + c x0_prev. One z serves the step's noise and the known region's
(as diffusers' RePaintScheduler reuses it); the jump's own Gaussian is independent of it, and a sum of
independent Gaussians is one Gaussian whose variance is the sum: so one draw per element, no second
launch. Rows that edit nothing (no mask, no jump) take the plain path, bit for bit, and read no edit
tensors; a batch with no editing row passes ``edit=None`` and pays nothing.

Rounding: the kernel is compiled without FMA contraction (``enable_fp_fusion=False``), so every
multiply and add rounds as the twin's do. With contraction (Triton's default) LLVM fuses a different set
of them in each specialisation, and on the H200 a row that edits nothing came out of the EDIT kernel 1 ulp
away from the plain kernel's (float32, 28x28 rows): a request's image would have depended on whether
another request in its batch was editing.

Three functions with one signature, each returning ``(x_prev, x0_hat or None)``:
- ``fused_reverse_step_triton``: the Triton kernel (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1);
- ``fused_reverse_step_torch``: the plain-PyTorch twin (Philox twin + ``reverse_step``);
- ``fused_reverse_step``: the dispatcher, ``DDPM_STEP_BACKEND=auto|triton|torch``.
This module depends on nothing of ``ddpm``: the samplers build coefficients, the kernel applies them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from kernels.philox import sample_noise

try:  # triton is a dependency, but keep the CPU path alive where it fails to import
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

BACKENDS = ("auto", "triton", "torch")
StepOutput = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class StepCoefficients:
    """Per-sample coefficients of one reverse step, each a float32 tensor of shape (B,)."""

    x0_from_x: torch.Tensor  # sqrt(1/abar_t)
    x0_from_eps: torch.Tensor  # sqrt(1/abar_t - 1)
    clip: torch.Tensor  # 1.0: clip x0_hat to [-1, 1]; 0.0: do not
    x: torch.Tensor  # a, the weight of x_t
    eps: torch.Tensor  # d, the weight of eps
    x0: torch.Tensor  # b, the weight of x0_hat
    x0_prev: torch.Tensor  # c, the weight of the previous step's x0_hat (multistep samplers)
    sigma: torch.Tensor  # the weight of z

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(StepCoefficients.__dataclass_fields__)

    def stacked(self) -> torch.Tensor:
        """All coefficients as one (8, B) tensor, in field order (the kernel's layout)."""
        return torch.stack([getattr(self, n) for n in self.names()])

    @staticmethod
    def from_stacked(table: torch.Tensor) -> StepCoefficients:
        return StepCoefficients(*table.unbind(0))

    @staticmethod
    def cat(parts: list[StepCoefficients]) -> StepCoefficients:
        return StepCoefficients(**{n: torch.cat([getattr(p, n) for p in parts]) for n in StepCoefficients.names()})


@dataclass(frozen=True)
class EditTerms:
    """Per-row editing inputs of one step (see the module docstring); rows that edit nothing have
    masked = 0, jump_x = 1, jump_z = 0, and their ``known``/``mask`` values are never read."""

    known: torch.Tensor  # (B, C, H, W) the input image x_known in [-1, 1]
    mask: torch.Tensor  # (B, C, H, W) float32: 1 where a pixel is known (kept), 0 where it is repainted
    masked: torch.Tensor  # (B,) 1.0 where the row has a mask
    known_x: torch.Tensor  # (B,) sqrt(abar_prev): the known region noised to the step's level (RePaint Eq. 8a)
    known_z: torch.Tensor  # (B,) sqrt(1 - abar_prev)
    jump_x: torch.Tensor  # (B,) sqrt(abar_up / abar_prev): the jump back up after the step (1: none)
    jump_z: torch.Tensor  # (B,) sqrt(1 - abar_up / abar_prev) (0: none)

    # the per-row coefficients by name, in the kernel's (5, B) layout; the last four are a chain's step's own
    # (``ddpm.editing.edit_table``: the known region's level, the jump back up), the mask flag is the row's
    ROWS = ("masked", "known_x", "known_z", "jump_x", "jump_z")
    CHAIN_ROWS = ROWS[1:]
    # a step that edits nothing
    IDENTITY: ClassVar[dict[str, float]] = {"masked": 0.0, "known_x": 0.0, "known_z": 0.0, "jump_x": 1.0, "jump_z": 0.0}

    @classmethod
    def from_chain_rows(cls, known: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor, rows: torch.Tensor) -> EditTerms:
        """The terms of a row's step from its chain's (4, B) ``CHAIN_ROWS`` and its own image, mask and flag."""
        return cls(known, mask, masked, **dict(zip(cls.CHAIN_ROWS, rows.unbind(0), strict=True)))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> EditTerms:
        """Every tensor through ``fn`` (to a device, a copy)."""
        return EditTerms(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def stacked(self) -> torch.Tensor:
        """The per-row coefficients as one (5, B) float32 tensor (the kernel's layout)."""
        return torch.stack([getattr(self, n).to(torch.float32) for n in self.ROWS])

    def edits(self) -> torch.Tensor:
        """(B,) bool: the rows that take the editing path."""
        return (self.masked > 0) | (self.jump_x != 1) | (self.jump_z != 0)


def _b(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * 3))  # (B,) -> (B, 1, 1, 1)


def reverse_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    coefs: StepCoefficients,
    z: torch.Tensor,
    x0_prev: torch.Tensor | None = None,
    edit: EditTerms | None = None,
) -> StepOutput:
    """The update in float32 (the kernel's operation order), x_prev returned in x_t's dtype; x0_hat
    (float32) too when ``x0_prev`` is given."""
    x, e = x_t.float(), eps.float()
    x0 = _b(coefs.x0_from_x) * x - _b(coefs.x0_from_eps) * e
    x0 = torch.where(_b(coefs.clip) > 0, x0.clamp(-1.0, 1.0), x0)
    mean = _b(coefs.x) * x + _b(coefs.eps) * e + _b(coefs.x0) * x0
    if x0_prev is not None:
        mean = mean + _b(coefs.x0_prev) * x0_prev.float()
    out = mean + _b(coefs.sigma) * z.float()
    if edit is not None:  # RePaint's blend and the jump back up, on the rows that edit
        m = torch.where(_b(edit.masked) > 0, edit.mask.float(), torch.zeros_like(mean))
        known = torch.where(_b(edit.masked) > 0, edit.known.float(), torch.zeros_like(mean))
        ux = _b(edit.jump_x)
        blended = ux * ((1.0 - m) * mean + m * (_b(edit.known_x) * known))
        noise = torch.sqrt((ux * ((1.0 - m) * _b(coefs.sigma) + m * _b(edit.known_z))) ** 2 + _b(edit.jump_z) ** 2)
        out = torch.where(_b(edit.edits()), blended + noise * z.float(), out)
    return out.to(x_t.dtype), (x0 if x0_prev is not None else None)


def fused_reverse_step_torch(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    coefs: StepCoefficients,
    seeds: torch.Tensor,
    noise_counter: torch.Tensor,
    x0_prev: torch.Tensor | None = None,
    edit: EditTerms | None = None,
) -> StepOutput:
    """Reference: z from the Philox twin keyed by (seeds[i], noise_counter[i], element), then ``reverse_step``.
    Like the kernel's wrapper, it takes the per-row inputs on any device and computes on x_t's."""
    device = x_t.device
    seeds = seeds.to(device)
    noise_counter = torch.as_tensor(noise_counter).to(device)
    coefs = StepCoefficients(*(getattr(coefs, n).to(device) for n in StepCoefficients.names()))
    if edit is not None:
        edit = edit.map(lambda t: t.to(device))
    z = sample_noise(seeds, noise_counter, tuple(x_t.shape[1:]))
    return reverse_step(x_t, eps, coefs, z, x0_prev, edit)


if HAVE_TRITON:
    # the rows of the kernel's (5, B) edit table by name (EditTerms.ROWS): jit code reads constexpr globals only
    _EDIT_MASKED = tl.constexpr(EditTerms.ROWS.index("masked"))
    _EDIT_KNOWN_X = tl.constexpr(EditTerms.ROWS.index("known_x"))
    _EDIT_KNOWN_Z = tl.constexpr(EditTerms.ROWS.index("known_z"))
    _EDIT_JUMP_X = tl.constexpr(EditTerms.ROWS.index("jump_x"))
    _EDIT_JUMP_Z = tl.constexpr(EditTerms.ROWS.index("jump_z"))

    @triton.jit
    def _reverse_step_kernel(
        x_ptr,
        eps_ptr,
        out_ptr,
        x0_prev_ptr,  # (B, C, H, W) float32, read only when MULTISTEP
        x0_out_ptr,  # (B, C, H, W) float32, written only when MULTISTEP
        known_ptr,  # (B, C, H, W) float32, read only when EDIT, on rows with a mask
        mask_ptr,  # (B, C, H, W) float32, likewise
        edit_ptr,  # (5, B) float32, EditTerms.ROWS, read only when EDIT
        coef_ptr,  # (8, B) float32, rows in StepCoefficients field order
        seed_ptr,  # (B,) int64: the bits of each sample's uint64 Philox key
        counter_ptr,  # (B,) int64: the counter (the paper's t) whose noise is drawn
        B,
        N,  # elements per sample, C*H*W
        C,
        W,
        MULTISTEP: tl.constexpr,
        EDIT: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid_blk = tl.program_id(0)
        b = tl.program_id(1)
        p = pid_blk * BLOCK + tl.arange(0, BLOCK)  # position within the sample, in memory order
        mask = p < N
        base = b.to(tl.int64) * N  # int64: B*N may pass 2^31
        x = tl.load(x_ptr + base + p, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(eps_ptr + base + p, mask=mask, other=0.0).to(tl.float32)

        # the logical NCHW index of each element keys the noise, so z is the same in either layout
        if CHANNELS_LAST:
            c = p % C
            w = (p // C) % W
            h = p // (C * W)
            elem = c * (N // C) + h * W + w
        else:
            elem = p
        seed = tl.load(seed_ptr + b)
        counter = tl.load(counter_ptr + b)
        z = tl.randn(seed, (counter << 32) | elem.to(tl.int64))  # Philox4x32-10 + Box-Muller, in registers

        x0_from_x = tl.load(coef_ptr + b)
        x0_from_eps = tl.load(coef_ptr + B + b)
        clip = tl.load(coef_ptr + 2 * B + b)
        a_x = tl.load(coef_ptr + 3 * B + b)
        a_eps = tl.load(coef_ptr + 4 * B + b)
        a_x0 = tl.load(coef_ptr + 5 * B + b)
        a_x0_prev = tl.load(coef_ptr + 6 * B + b)
        sigma = tl.load(coef_ptr + 7 * B + b)
        x0 = x0_from_x * x - x0_from_eps * e
        x0 = tl.where(clip > 0, tl.minimum(tl.maximum(x0, -1.0), 1.0), x0)
        out = a_x * x + a_eps * e + a_x0 * x0
        if MULTISTEP:
            out = out + a_x0_prev * tl.load(x0_prev_ptr + base + p, mask=mask, other=0.0)
            tl.store(x0_out_ptr + base + p, x0, mask=mask)
        if EDIT:
            masked = tl.load(edit_ptr + _EDIT_MASKED * B + b)
            jump_x = tl.load(edit_ptr + _EDIT_JUMP_X * B + b)
            jump_z = tl.load(edit_ptr + _EDIT_JUMP_Z * B + b)
            edits = (masked > 0).to(tl.int32) + (jump_x != 1.0).to(tl.int32) + (jump_z != 0.0).to(tl.int32)
            if edits > 0:  # uniform per program (one row per program): rows that edit nothing read nothing more
                m = tl.where(masked > 0, tl.load(mask_ptr + base + p, mask=mask, other=0.0), 0.0)
                known = tl.where(masked > 0, tl.load(known_ptr + base + p, mask=mask, other=0.0), 0.0)
                known_x = tl.load(edit_ptr + _EDIT_KNOWN_X * B + b)
                known_z = tl.load(edit_ptr + _EDIT_KNOWN_Z * B + b)
                blended = jump_x * ((1.0 - m) * out + m * (known_x * known))
                # (not `w`: the compiler types a name once per kernel, and CHANNELS_LAST's w is an int index)
                std = jump_x * ((1.0 - m) * sigma + m * known_z)
                out = blended + tl.sqrt(std * std + jump_z * jump_z) * z  # two Gaussians make one
            else:
                out = out + sigma * z
        else:
            out = out + sigma * z
        tl.store(out_ptr + base + p, out.to(out_ptr.dtype.element_ty), mask=mask)


def _layout(x: torch.Tensor) -> bool | None:
    """True for dense channels-last, False for contiguous NCHW, None for anything else."""
    if x.is_contiguous():
        return False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return True
    return None


def fused_reverse_step_triton(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    coefs: StepCoefficients,
    seeds: torch.Tensor,
    noise_counter: torch.Tensor,
    x0_prev: torch.Tensor | None = None,
    edit: EditTerms | None = None,
) -> StepOutput:
    """One launch for the whole mixed batch; x_prev in x_t's dtype and memory layout, x0_hat float32."""
    if not HAVE_TRITON:
        raise RuntimeError(TRITON_MISSING)
    if x_t.shape != eps.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and eps {tuple(eps.shape)} differ in shape")
    channels_last = _layout(x_t)
    if channels_last is None:
        x_t = x_t.contiguous()
        channels_last = False
    if eps.stride() != x_t.stride() or eps.dtype != x_t.dtype:
        eps = torch.empty_like(x_t).copy_(eps)  # same layout and dtype as x_t
    multistep = x0_prev is not None
    if multistep:
        if x0_prev.shape != x_t.shape:
            raise ValueError(f"x0_prev {tuple(x0_prev.shape)} and x_t {tuple(x_t.shape)} differ in shape")
        if x0_prev.stride() != x_t.stride() or x0_prev.dtype != torch.float32:
            x0_prev = torch.empty_like(x_t, dtype=torch.float32).copy_(x0_prev)
    if edit is not None:
        known, mask = (_like(edit.known, x_t, "known"), _like(edit.mask, x_t, "mask"))
    b = x_t.shape[0]
    n = x_t[0].numel() if b else 0
    out = torch.empty_like(x_t)
    x0_out = torch.empty_like(x_t, dtype=torch.float32) if multistep else None
    if b == 0 or n == 0:
        return out, x0_out
    if n >= 2**31 or b > 65535:
        raise ValueError("one sample must have < 2^31 elements and a batch <= 65535 samples")
    coef = coefs.stacked().to(device=x_t.device, dtype=torch.float32).contiguous()  # (8, B)
    seeds = seeds.to(device=x_t.device, dtype=torch.int64).contiguous()
    counter = torch.as_tensor(noise_counter, device=x_t.device, dtype=torch.int64).expand(b).contiguous()
    channels = x_t.shape[1] if x_t.dim() > 1 else 1
    width = x_t.shape[-1] if x_t.dim() == 4 else 1
    block = min(1024, triton.next_power_of_2(n))
    grid = (triton.cdiv(n, block), b)
    state_in = x0_prev if multistep else out  # placeholders never touched when not MULTISTEP
    state_out = x0_out if multistep else out
    if edit is not None:
        edit_coef = edit.stacked().to(device=x_t.device).contiguous()  # (5, B)
    else:
        known = mask = edit_coef = coef  # placeholders never touched when not EDIT
    _reverse_step_kernel[grid](
        x_t, eps, out, state_in, state_out, known, mask, edit_coef, coef, seeds, counter, b, n, channels, width,
        MULTISTEP=multistep, EDIT=edit is not None, CHANNELS_LAST=channels_last, BLOCK=block, num_warps=4 if block >= 512 else 2,
        enable_fp_fusion=False,  # no FMA contraction: see the module docstring ("Rounding")
    )  # fmt: skip
    return out, x0_out


def _like(t: torch.Tensor, x_t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as float32 in x_t's shape and memory layout (the kernel indexes both the same way)."""
    if t.shape != x_t.shape:
        t = t.expand_as(x_t) if t.dim() == x_t.dim() else t
        if t.shape != x_t.shape:
            raise ValueError(f"{name} {tuple(t.shape)} and x_t {tuple(x_t.shape)} differ in shape")
    if t.stride() != x_t.stride() or t.dtype != torch.float32:
        t = torch.empty_like(x_t, dtype=torch.float32).copy_(t)
    return t


def _triton_runs_on(x: torch.Tensor) -> bool:
    return HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def step_backend() -> str:
    backend = os.environ.get("DDPM_STEP_BACKEND", "auto").strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"DDPM_STEP_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``auto`` made concrete for tensors on ``device``: Triton on CUDA, the PyTorch twin elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"step backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if torch.device(device).type == "cuda" else "torch"


TRITON_MISSING = "triton is not installed: pip install 'ddpm-serve[gpu]' (PyPI's CUDA build of torch brings it too)"


def check_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for ``device``, or a RuntimeError saying why it cannot run there: checked
    when a sampler or server starts, not at its first step."""
    concrete = resolve_backend(backend, device)
    if concrete == "triton":
        if not HAVE_TRITON:
            raise RuntimeError(f"DDPM_STEP_BACKEND=triton: {TRITON_MISSING}")
        if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("DDPM_STEP_BACKEND=triton needs a CUDA device (or TRITON_INTERPRET=1 to interpret it on CPU)")
    return concrete


def fused_reverse_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    coefs: StepCoefficients,
    seeds: torch.Tensor,
    noise_counter: torch.Tensor,
    x0_prev: torch.Tensor | None = None,
    edit: EditTerms | None = None,
    backend: str | None = None,
) -> StepOutput:
    """Dispatch: Triton on CUDA tensors, the PyTorch twin on CPU; ``backend`` (default: the
    ``DDPM_STEP_BACKEND`` environment variable) overrides."""
    if resolve_backend(step_backend() if backend is None else backend, x_t.device) == "torch":
        return fused_reverse_step_torch(x_t, eps, coefs, seeds, noise_counter, x0_prev, edit)
    if not HAVE_TRITON:
        raise RuntimeError(f"DDPM_STEP_BACKEND=triton: {TRITON_MISSING}")
    if not _triton_runs_on(x_t):
        raise RuntimeError("DDPM_STEP_BACKEND=triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return fused_reverse_step_triton(x_t, eps, coefs, seeds, noise_counter, x0_prev, edit)
