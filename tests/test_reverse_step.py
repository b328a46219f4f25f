"""The fused reverse-step kernel (Triton, in interpreter mode on CPU) against its PyTorch twin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.chain import ChainTables
from ddpm.respace import respace_steps
from ddpm.schedule import VarianceType, make_schedule
from kernels.philox import philox_randn, sample_noise, seeds_to_tensor
from kernels.reverse_step import StepCoefficients, fused_reverse_step, fused_reverse_step_torch, fused_reverse_step_triton, reverse_step

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parent.parent
SCHEDULE = make_schedule("linear", 1000)
TABLES = ChainTables(SCHEDULE, VarianceType.FIXED_LARGE, clip=False)  # Eq. 11
CLIPPED = ChainTables(SCHEDULE, VarianceType.FIXED_LARGE, clip=True)  # Eq. 7 with x0 clipped
SEEDS = [0, 1, 12345, 2**32 - 1, 2**32, 2**40 + 7, 2**63 - 1, 2**63 + 5, 2**64 - 1]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, positions: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    eps = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    pos = torch.tensor(positions)
    return x, eps, pos


def _unit_noise_coefs(b: int) -> StepCoefficients:
    """Coefficients that make the step output z itself: mean = 0, sigma = 1."""
    zeros, ones = torch.zeros(b), torch.ones(b)
    return StepCoefficients(zeros, zeros, zeros, zeros, zeros, zeros, zeros, ones)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("counter", [0, 1, 500, 1000])
def test_kernel_noise_equals_twin(seed: int, counter: int) -> None:
    shape = (2, 3, 9, 11)
    seeds = seeds_to_tensor([seed, seed ^ 0x5555])
    zero = torch.zeros(shape, device=DEVICE)
    z_kernel, _ = fused_reverse_step_triton(zero, zero, _unit_noise_coefs(2), seeds, torch.tensor([counter, counter]))
    z_twin = sample_noise(seeds, counter, shape[1:])
    assert (z_kernel.cpu() - z_twin).abs().max().item() <= 1e-6


def test_twin_equals_tl_randn_directly() -> None:
    """A bare tl.randn kernel, with no project code in it, against the twin."""
    import triton
    import triton.language as tl

    @triton.jit
    def randn_kernel(out_ptr, seed, offset_base, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.randn(seed, offset_base + offs.to(tl.int64)))

    for seed in [7, 2**35 + 1]:
        out = torch.empty(256, device=DEVICE)
        randn_kernel[(1,)](out, seed, 3 << 32, BLOCK=256)
        twin = philox_randn(seeds_to_tensor([seed]), (3 << 32) + torch.arange(256))
        assert (out.cpu() - twin).abs().max().item() <= 1e-6


def test_the_twins_noise_traces_to_a_graph_inductor_can_cache() -> None:
    """What dynamo captures of the twin's noise with dynamic shapes (as ``compiled_step_twin`` compiles it) holds no
    ``torch.tensor`` call: AOTAutograd's cache passes such a graph by, and inductor, finding its float argument
    symbolic, specialised it and made dynamo trace the whole twin a second time. Together they cost every compile of
    the step twin from a warm cache 10 s on a 2-core CPU (14.4 -> 4.2 s; the constants are Python floats now)."""
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: list[object]) -> object:
        graphs.append(gm)
        return gm.forward

    traced = torch.compile(philox_randn, backend=keep, dynamic=True)
    seeds, offsets = seeds_to_tensor([7, 2**35 + 1])[:, None], (3 << 32) + torch.arange(64)[None, :]
    assert torch.equal(traced(seeds, offsets), philox_randn(seeds, offsets))
    assert len(graphs) == 1
    calls = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert torch.tensor not in calls and torch.as_tensor not in calls, calls


SHAPES = [(1, 1, 8, 8), (4, 3, 32, 32), (3, 1, 28, 28), (5, 3, 33, 17), (2, 2, 1, 1)]
DTYPES = [(torch.float32, 1e-6, 1e-6), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 2e-2, 1e-2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES, ids=lambda v: str(v))
@pytest.mark.parametrize("clip", [False, True])
def test_kernel_equals_twin(shape: tuple[int, ...], dtype: torch.dtype, atol: float, rtol: float, clip: bool) -> None:
    b = shape[0]
    x, eps, pos = _inputs(shape, dtype, [int(p) for p in np.linspace(999, 0, b)])
    coefs = (CLIPPED if clip else TABLES).coefficients(pos)
    seeds = seeds_to_tensor(SEEDS[:b])
    out_kernel, none = fused_reverse_step_triton(x, eps, coefs, seeds, pos + 1)
    out_twin, _ = fused_reverse_step_torch(x.cpu(), eps.cpu(), coefs, seeds, pos + 1)
    assert out_kernel.dtype == dtype and out_kernel.shape == shape and none is None
    torch.testing.assert_close(out_kernel.cpu().float(), out_twin.float(), atol=atol, rtol=rtol)


MIXED = {
    "ddpm": ChainTables(respace_steps(SCHEDULE, 50), VarianceType.FIXED_SMALL, clip=True),
    "ddim": ChainTables(respace_steps(SCHEDULE, 20, "trailing"), VarianceType.FIXED_SMALL, sampler="ddim", eta=0.5, clip=False),
    "dpmsolver++": ChainTables(respace_steps(SCHEDULE, 10, "trailing"), VarianceType.FIXED_SMALL, sampler="dpmsolver++", clip=True),
}


@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (6, 3, 9, 11)], ids=str)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES, ids=lambda v: str(v))
def test_mixed_samplers_in_one_launch_equal_twin(shape: tuple[int, ...], dtype: torch.dtype, atol: float, rtol: float) -> None:
    """Rows of three samplers (one multistep) at several positions: one launch, x_prev and x0_hat both checked."""
    b = shape[0]
    x, eps, _ = _inputs(shape, dtype, [0] * b, seed=4)
    names = list(MIXED)
    parts = [MIXED[names[i % 3]].coefficients(torch.tensor([(7 * i) % MIXED[names[i % 3]].num_steps])) for i in range(b)]
    coefs = StepCoefficients.cat(parts)
    x0_prev = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    counter = torch.arange(b) * 37 + 1
    seeds = seeds_to_tensor(SEEDS[:b])
    out_kernel, x0_kernel = fused_reverse_step_triton(x, eps, coefs, seeds, counter, x0_prev)
    out_twin, x0_twin = fused_reverse_step_torch(x.cpu(), eps.cpu(), coefs, seeds, counter, x0_prev.cpu())
    assert x0_kernel is not None and x0_twin is not None and x0_kernel.dtype == torch.float32
    torch.testing.assert_close(out_kernel.cpu().float(), out_twin.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(x0_kernel.cpu(), x0_twin, atol=atol, rtol=rtol)
    # the rows of single-step samplers ignore x0_prev: the same values without the multistep state
    single = [i for i in range(b) if names[i % 3] != "dpmsolver++"]
    alone, _ = fused_reverse_step_triton(x, eps, coefs, seeds, counter)
    assert torch.equal(alone[single], out_kernel[single])


def test_kernel_on_odd_large_shape() -> None:
    x, eps, pos = _inputs((2, 3, 123, 123), torch.float32, [700, 3])
    coefs, seeds = TABLES.coefficients(pos), seeds_to_tensor([11, 12])
    kernel, _ = fused_reverse_step_triton(x, eps, coefs, seeds, pos + 1)
    twin, _ = fused_reverse_step_torch(x.cpu(), eps.cpu(), coefs, seeds, pos + 1)
    torch.testing.assert_close(kernel.cpu(), twin, atol=1e-6, rtol=1e-6)


def test_textbook_formula() -> None:
    """x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z, in float64 numpy."""
    s = make_schedule("linear", 1000)
    x, eps, pos = _inputs((3, 2, 5, 5), torch.float32, [999, 400, 0])
    seeds = seeds_to_tensor([5, 6, 7])
    out = fused_reverse_step_triton(x, eps, TABLES.coefficients(pos), seeds, pos + 1)[0].cpu().double().numpy()
    z = sample_noise(seeds, pos + 1, (2, 5, 5)).double().numpy()
    xn, en = x.cpu().double().numpy(), eps.cpu().double().numpy()
    for i, t in enumerate(pos.tolist()):
        sigma = 0.0 if t == 0 else np.sqrt(s.betas[t])
        expected = (xn[i] - s.betas[t] / np.sqrt(1 - s.alphas_cumprod[t]) * en[i]) / np.sqrt(s.alphas[t]) + sigma * z[i]
        np.testing.assert_allclose(out[i], expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("step_fn", [fused_reverse_step_triton, fused_reverse_step_torch], ids=["triton", "torch"])
def test_channels_last_gives_the_same_values(step_fn) -> None:  # type: ignore[no-untyped-def]
    x, eps, pos = _inputs((3, 4, 6, 5), torch.float32, [10, 20, 30])
    coefs, seeds = TABLES.coefficients(pos), seeds_to_tensor([1, 2, 3])
    plain, _ = step_fn(x, eps, coefs, seeds, pos + 1)
    cl, _ = step_fn(x.to(memory_format=torch.channels_last), eps.to(memory_format=torch.channels_last), coefs, seeds, pos + 1)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain.contiguous(), cl.contiguous())


@pytest.mark.parametrize("step_fn", [fused_reverse_step_triton, fused_reverse_step_torch], ids=["triton", "torch"])
def test_batch_invariance(step_fn) -> None:  # type: ignore[no-untyped-def]
    """Sample 0 gives the same output alone, at another position, and beside other timesteps."""
    x, eps, pos = _inputs((4, 1, 12, 12), torch.float32, [600, 999, 3, 0])
    seeds = seeds_to_tensor([42, 43, 44, 45])
    full, _ = step_fn(x, eps, TABLES.coefficients(pos), seeds, pos + 1)
    alone, _ = step_fn(x[:1], eps[:1], TABLES.coefficients(pos[:1]), seeds[:1], pos[:1] + 1)
    perm = torch.tensor([2, 3, 0, 1])
    shuffled, _ = step_fn(x[perm], eps[perm], TABLES.coefficients(pos[perm]), seeds[perm], pos[perm] + 1)
    assert torch.equal(full[0], alone[0])
    assert torch.equal(full[0], shuffled[2])
    assert torch.equal(full, shuffled[torch.argsort(perm)])


def test_noise_statistics() -> None:
    n = 64 * 64
    seeds = seeds_to_tensor(list(range(100, 164)))
    z = sample_noise(seeds, 7, (1, 64, 64)).reshape(64, n).double()
    assert abs(z.mean().item()) < 0.005 and abs(z.std().item() - 1) < 0.005
    # fourth moment of a standard normal is 3
    assert abs((z**4).mean().item() - 3) < 0.05

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    limit = 4 / np.sqrt(n)  # ~4 standard errors of a correlation over n pairs
    assert abs(corr(z[:-1], z[1:])) < limit / 8  # neighbouring seeds (n*63 pairs)
    other_step = sample_noise(seeds, 8, (1, 64, 64)).reshape(64, n).double()
    assert abs(corr(z, other_step)) < limit / 8  # neighbouring steps
    assert abs(corr(z[:, :-1], z[:, 1:])) < limit / 8  # neighbouring elements
    # the hardest case for a counter-based generator: seeds differing in one bit
    one_bit = sample_noise(seeds_to_tensor([2**40, 2**40 + 1]), 7, (1, 64, 64)).reshape(2, n).double()
    assert abs(corr(one_bit[0], one_bit[1])) < limit


def test_dispatcher(monkeypatch: pytest.MonkeyPatch) -> None:
    x, eps, pos = _inputs((2, 1, 4, 4), torch.float32, [5, 6])
    coefs, seeds = TABLES.coefficients(pos), seeds_to_tensor([1, 2])
    expected, _ = fused_reverse_step_torch(x.cpu(), eps.cpu(), coefs, seeds, pos + 1)
    for backend in ["auto", "torch", "triton"]:
        monkeypatch.setenv("DDPM_STEP_BACKEND", backend)
        torch.testing.assert_close(fused_reverse_step(x, eps, coefs, seeds, pos + 1)[0].cpu(), expected, atol=1e-6, rtol=1e-6)
    monkeypatch.setenv("DDPM_STEP_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="DDPM_STEP_BACKEND"):
        fused_reverse_step(x, eps, coefs, seeds, pos + 1)
    # an explicit backend (the server's DDPM_STEP_BACKEND setting) wins over the environment
    explicit, _ = fused_reverse_step(x, eps, coefs, seeds, pos + 1, backend="torch")
    torch.testing.assert_close(explicit.cpu(), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="step backend"):
        fused_reverse_step(x, eps, coefs, seeds, pos + 1, backend="gpu")


def test_reference_is_reverse_step() -> None:
    x, eps, pos = _inputs((2, 1, 4, 4), torch.float32, [5, 900])
    coefs, seeds = TABLES.coefficients(pos), seeds_to_tensor([1, 2])
    x, eps, z = x.cpu(), eps.cpu(), sample_noise(seeds, pos + 1, (1, 4, 4))  # reverse_step: one device (the twin moves rows)
    assert torch.equal(fused_reverse_step_torch(x, eps, coefs, seeds, pos + 1)[0], reverse_step(x, eps, coefs, z)[0])


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="the interpreter truncates fp32 -> bf16 (triton/runtime/interpreter.py cast_impl passes no rounding mode); "
    "compiled Triton rounds to nearest even by default, which this checks on CUDA (the GPU check runs it)",
)
def test_bf16_output_rounds_to_nearest_even() -> None:
    shape = (4, 3, 32, 32)
    x, eps, pos = _inputs(shape, torch.bfloat16, [0, 10, 500, 999])
    coefs = TABLES.coefficients(pos)
    seeds = seeds_to_tensor(SEEDS[:4])
    out = fused_reverse_step_triton(x, eps, coefs, seeds, pos + 1)[0].cpu().float()
    twin = fused_reverse_step_torch(x.cpu(), eps.cpu(), coefs, seeds, pos + 1)[0].float()  # fp32 math, .to(bf16) rounds RNE
    differ = (out != twin).float().mean().item()
    # fp32 results that differ in the last bit (operation order, ~4% of values) flip a bf16 rounding rarely;
    # truncation would make ~50% differ
    assert differ < 0.01, differ
    ulp = 2.0 ** (torch.floor(torch.log2(twin.abs().clamp_min(1e-30))) - 7)  # one bf16 ulp at each value
    assert ((out - twin).abs() <= ulp).all()


AOT_COMPILE = """
import itertools, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.reverse_step import _reverse_step_kernel

data = "*" + sys.argv[1]
signature = {"x_ptr": data, "eps_ptr": data, "out_ptr": data}
signature.update({name: "*fp32" for name in ("x0_prev_ptr", "x0_out_ptr", "known_ptr", "mask_ptr", "edit_ptr", "coef_ptr")})
signature.update({"seed_ptr": "*i64", "counter_ptr": "*i64", "B": "i32", "N": "i32", "C": "i32", "W": "i32"})
signature.update({name: "constexpr" for name in ("MULTISTEP", "EDIT", "CHANNELS_LAST", "BLOCK")})
built = []
for multistep, edit, channels_last in itertools.product((False, True), repeat=3):
    flags = {"MULTISTEP": multistep, "EDIT": edit, "CHANNELS_LAST": channels_last, "BLOCK": 1024}
    kernel = triton.compile(ASTSource(_reverse_step_kernel, signature, constexprs=flags), target=GPUTarget("cuda", 90, 32),
                            options={"enable_fp_fusion": False})
    built.append({"flags": flags, "cubin_bytes": len(kernel.asm["cubin"]), "sm_90": ".target sm_90" in kernel.asm["ptx"]})
print(json.dumps(built))
"""


def _cuda_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except ImportError:  # pragma: no cover
        return False


@pytest.mark.skipif(not _cuda_backend(), reason="this triton has no CUDA backend to compile for")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_kernel_compiles_for_the_h200_without_a_gpu(dtype: str, tmp_path: Path) -> None:
    """Every specialisation (multistep, edit, layout) through Triton's whole CUDA pipeline to an sm_90 cubin,
    ahead of time, on a machine without a GPU: what the interpreter never checks (only constexpr globals,
    the types of jit code, ptxas) fails here, not on the day a GPU is lent. In a child process without
    TRITON_INTERPRET (under it, @triton.jit makes interpreted functions that cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", AOT_COMPILE, dtype], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(built) == 8 and all(k["sm_90"] and k["cubin_bytes"] > 0 for k in built), built
