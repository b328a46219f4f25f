"""Low precision for the U-Net only: ``eps_theta`` under ``torch.autocast``, everything else fp32.

The chain state x_t, the coefficient tables and the fused step's arithmetic stay float32, so
rounding does not accumulate over 1000 steps: each step sees one eps rounded to bf16/fp16
precision, the same as one noisy U-Net evaluation. ``DDPM_PRECISION`` (server) and ``--precision``
(``ddpm sample``/``eval``):

- ``fp32``: as trained.
- ``bf16``: the U-Net's matmuls and convolutions in bfloat16 (CUDA with bf16, or a CPU whose oneDNN
  has native bf16: AVX-512 BF16 / AMX; elsewhere it works but is far slower than fp32).
- ``fp16``: CUDA only.
- ``auto``: bf16 where the device does it natively AND ``AUTO_ALLOWS_BF16`` (set from the quality
  table in BENCHMARKS.md: bf16 may be the default only where its samples are as good as fp32's),
  fp32 elsewhere. What was picked is logged and exported (``ddpm_model_info{precision}``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ddpm.chain import EpsModel
from ddpm.names import PRECISION_SETTINGS

log = logging.getLogger("ddpm.precision")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Whether `auto` may pick bf16 on hardware that has it: decided by measured quality (BENCHMARKS.md,
# "Low precision"), not assumed.
AUTO_ALLOWS_BF16 = True


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) whose kernels do bf16 natively: AVX-512 BF16 and later, AMX
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
                    "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT")  # fmt: skip


def native_bf16(device: torch.device | str) -> bool:
    """Does this device run bf16 matmuls natively (not emulated through fp32)? On a CPU, oneDNN's cap
    (ONEDNN_MAX_CPU_ISA, e.g. AVX2 to run the AVX2 kernels on an AVX-512 machine) is honoured: the
    CPU's flags say bf16, but oneDNN would emulate it far slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
        if cap and cap not in ONEDNN_BF16_ISAS:
            return False
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(probe()) if probe is not None else False
    return False


def cpu_capability() -> str:
    """The CPU's name and the flags that decide low-precision speed, for every printed figure."""
    name = "unknown CPU"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"]
    have = [f for f in wanted if f in flags]
    return f"{name} [{', '.join(have) or 'no AVX2'}; torch capability {torch.backends.cpu.get_cpu_capability()}]"


def resolve_precision(setting: str, device: torch.device | str) -> str:
    """The concrete precision (fp32, bf16, fp16) a setting means on a device."""
    if setting not in PRECISION_SETTINGS:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_SETTINGS)}, got {setting!r}")
    device = torch.device(device)
    if setting == "auto":
        return "bf16" if AUTO_ALLOWS_BF16 and native_bf16(device) else "fp32"
    if setting == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA (on CPU use bf16 or fp32)")
    if setting == "bf16" and not native_bf16(device):
        log.warning("bf16 on %s without native support: correct, but much slower than fp32", device)
    return setting


def with_precision(eps_model: EpsModel, precision: str, device: torch.device | str) -> EpsModel:
    """eps_theta run under autocast at ``precision``, returning float32 (identity for fp32).

    Autocast's weight-cast cache is off: it would save re-casting a weight within one call, which one
    forward never does twice, and its global mutex is taken around the cast itself, which under a
    tracing fake-tensor mode calls back into Python: a thread compiling the U-Net in the background
    (service/engine/background_compile.py) then holds that mutex waiting for the GIL while the serving
    thread holds the GIL waiting for the mutex (autocast's exit clears the cache). Seen as a deadlock
    of both threads when the compile started from loaded artefacts; the values are the same either way."""
    if precision == "fp32":
        return eps_model
    dtype, device_type = DTYPES[precision], torch.device(device).type

    def low_precision_eps(x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
            eps = eps_model(x, t, *labels)  # labels: a class-conditional model's y
        return eps.float()  # the step and the chain state stay fp32

    return low_precision_eps


def pixel_drift(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How far two sample sets of the same seeds lie apart, images in [-1, 1] compared in [0, 1]
    pixel units: max and mean |difference|, and the share of 8-bit pixels that change."""
    ua, ub = (a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2
    d = (ua - ub).abs()
    changed = ((ua * 255).round() != (ub * 255).round()).float().mean().item()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "share_8bit_changed": changed}
