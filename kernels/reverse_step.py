"""The fused DDPM reverse step with in-kernel noise (Algorithm 2, line 4, for a mixed batch).

    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1 - abar_t) eps) + sigma_t z          (Eq. 11)
    clipped: x0 = clip(sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, -1, 1)
             x_{t-1} = coef1_t x0 + coef2_t x_t + sigma_t z                               (Eq. 7)

Every sample i has its own coefficients (so samples at different timesteps and in different
respaced chains share a launch), its own Philox key ``seeds[i]`` and its own noise counter
``noise_counter[i]`` (the paper's t). z is drawn in registers by ``tl.randn`` at offset
``(noise_counter[i] << 32) | e`` for the sample's logical NCHW element e: it never touches memory and
depends on (seed, t, e) only, never on the batch.

Three functions with one signature:
- ``fused_reverse_step_triton``: the Triton kernel (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1);
- ``fused_reverse_step_torch``: the plain-PyTorch twin (Philox twin + ``ddpm.sampler.reverse_step``);
- ``fused_reverse_step``: the dispatcher, ``DDPM_STEP_BACKEND=auto|triton|torch``.
"""

from __future__ import annotations

import os

import torch

from ddpm.sampler import StepCoefficients, reverse_step
from kernels.philox import sample_noise

try:  # triton is a dependency, but keep the CPU path alive where it fails to import
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def fused_reverse_step_torch(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    coefs: StepCoefficients,
    seeds: torch.Tensor,
    noise_counter: torch.Tensor,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Reference: z from the Philox twin keyed by (seeds[i], noise_counter[i], element), then Eq. 11 / Eq. 7."""
    z = sample_noise(seeds, noise_counter, tuple(x_t.shape[1:]))
    return reverse_step(x_t, eps, coefs, z, clip_denoised)


if HAVE_TRITON:

    @triton.jit
    def _reverse_step_kernel(
        x_ptr,
        eps_ptr,
        out_ptr,
        coef_ptr,  # (7, B) float32, rows in StepCoefficients field order
        seed_ptr,  # (B,) int64: the bits of each sample's uint64 Philox key
        counter_ptr,  # (B,) int64: the paper's t whose noise is drawn
        B,
        N,  # elements per sample, C*H*W
        C,
        W,
        CLIP: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid_blk = tl.program_id(0)
        b = tl.program_id(1)
        p = pid_blk * BLOCK + tl.arange(0, BLOCK)  # position within the sample, in memory order
        mask = p < N
        base = b.to(tl.int64) * N  # int64: B*N may pass 2^31
        # read N of x and N of eps (input dtype), write N of out: 3 passes over the batch, nothing else
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

        sigma = tl.load(coef_ptr + 2 * B + b)
        if CLIP:
            sqrt_recip_abar = tl.load(coef_ptr + 3 * B + b)
            sqrt_recipm1_abar = tl.load(coef_ptr + 4 * B + b)
            post_coef1 = tl.load(coef_ptr + 5 * B + b)
            post_coef2 = tl.load(coef_ptr + 6 * B + b)
            x0 = sqrt_recip_abar * x - sqrt_recipm1_abar * e
            x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
            mean = post_coef1 * x0 + post_coef2 * x
        else:
            recip_sqrt_alpha = tl.load(coef_ptr + b)
            eps_coef = tl.load(coef_ptr + B + b)
            mean = recip_sqrt_alpha * (x - eps_coef * e)
        out = mean + sigma * z
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
    clip_denoised: bool = False,
) -> torch.Tensor:
    """One launch for the whole mixed batch; returns x_{t-1} in x_t's dtype and memory layout."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    if x_t.shape != eps.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and eps {tuple(eps.shape)} differ in shape")
    channels_last = _layout(x_t)
    if channels_last is None:
        x_t = x_t.contiguous()
        channels_last = False
    if eps.stride() != x_t.stride() or eps.dtype != x_t.dtype:
        eps = torch.empty_like(x_t).copy_(eps)  # same layout and dtype as x_t
    b = x_t.shape[0]
    n = x_t[0].numel() if b else 0
    out = torch.empty_like(x_t)
    if b == 0 or n == 0:
        return out
    if n >= 2**31 or b > 65535:
        raise ValueError("one sample must have < 2^31 elements and a batch <= 65535 samples")
    coef = coefs.stacked().to(device=x_t.device, dtype=torch.float32).contiguous()  # (7, B)
    seeds = seeds.to(device=x_t.device, dtype=torch.int64).contiguous()
    counter = torch.as_tensor(noise_counter, device=x_t.device, dtype=torch.int64).expand(b).contiguous()
    channels = x_t.shape[1] if x_t.dim() > 1 else 1
    width = x_t.shape[-1] if x_t.dim() == 4 else 1
    block = min(1024, triton.next_power_of_2(n))
    grid = (triton.cdiv(n, block), b)
    _reverse_step_kernel[grid](
        x_t, eps, out, coef, seeds, counter, b, n, channels, width,
        CLIP=bool(clip_denoised), CHANNELS_LAST=channels_last, BLOCK=block, num_warps=4 if block >= 512 else 2,
    )  # fmt: skip
    return out


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


def fused_reverse_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    coefs: StepCoefficients,
    seeds: torch.Tensor,
    noise_counter: torch.Tensor,
    clip_denoised: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Dispatch: Triton on CUDA tensors, the PyTorch twin on CPU; ``backend`` (default: the
    ``DDPM_STEP_BACKEND`` environment variable) overrides."""
    if resolve_backend(step_backend() if backend is None else backend, x_t.device) == "torch":
        return fused_reverse_step_torch(x_t, eps, coefs, seeds, noise_counter, clip_denoised)
    if not _triton_runs_on(x_t):
        raise RuntimeError("DDPM_STEP_BACKEND=triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return fused_reverse_step_triton(x_t, eps, coefs, seeds, noise_counter, clip_denoised)
