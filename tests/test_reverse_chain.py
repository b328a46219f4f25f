"""The reverse chain of Algorithm 2: q(x_t | x_0) statistics, one step by hand, no noise at the last step,
clipping, the per-image seed rule, batch invariance, and whole chains against diffusers' DDPMScheduler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.chain import ChainTables, StepCoefficients, predict_x0, reverse_step
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.respace import respace_steps
from ddpm.schedule import VarianceType, make_schedule
from ddpm.seeding import image_seed, image_seeds, splitmix64
from ddpm.train import q_sample
from kernels.philox import sample_noise, seeds_to_tensor
from tests.batch_rounding import BATCH_ROUNDING


def test_q_sample_statistics() -> None:
    s = make_schedule("linear", 1000)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    gen = torch.Generator().manual_seed(0)
    for t in [0, 250, 999]:
        noise = torch.randn(x0.shape, generator=gen)
        x_t = q_sample(s.tensor("sqrt_alphas_cumprod"), s.tensor("sqrt_one_minus_alphas_cumprod"), x0, torch.full((20000,), t), noise)
        mean, var = x_t.mean().item(), x_t.var().item()
        assert mean == pytest.approx(0.7 * math.sqrt(s.alphas_cumprod[t]), abs=0.03)
        assert var == pytest.approx(1 - s.alphas_cumprod[t], rel=0.05, abs=1e-4)


def test_reverse_step_by_hand() -> None:
    """Eq. 11 with numbers worked out in plain Python at t = 500 (code index 499)."""
    s = make_schedule("linear", 1000)
    t = 499
    alpha, beta, abar = float(s.alphas[t]), float(s.betas[t]), float(s.alphas_cumprod[t])
    sigma = math.sqrt(beta)
    x, e, z = 0.3, -1.2, 0.5
    expected = 1 / math.sqrt(alpha) * (x - beta / math.sqrt(1 - abar) * e) + sigma * z
    tables = ChainTables(s, VarianceType.FIXED_LARGE, clip=False)
    coefs = tables.coefficients(torch.tensor([t]))
    out, _ = reverse_step(torch.full((1, 1, 1, 1), x), torch.full((1, 1, 1, 1), e), coefs, torch.full((1, 1, 1, 1), z))
    assert out.item() == pytest.approx(expected, rel=1e-6)
    # fixed_small uses beta_tilde; the clipped form (Eq. 7) equals the plain one (Eq. 11) when x0 is inside [-1, 1]
    small = ChainTables(s, VarianceType.FIXED_SMALL, clip=False).coefficients(torch.tensor([t]))
    small_clipped = ChainTables(s, VarianceType.FIXED_SMALL, clip=True).coefficients(torch.tensor([t]))
    assert small.sigma.item() == pytest.approx(math.sqrt(s.posterior_variance[t]), rel=1e-6)
    xt, eps = torch.full((1, 1, 1, 1), 0.2), torch.full((1, 1, 1, 1), 0.1)
    assert abs(predict_x0(xt, eps, small).item()) < 1
    a, _ = reverse_step(xt, eps, small, torch.zeros_like(xt))
    b, _ = reverse_step(xt, eps, small_clipped, torch.zeros_like(xt))
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_last_step_adds_no_noise() -> None:
    for vt in VarianceType:
        coefs = ChainTables(make_schedule(), vt).coefficients(torch.tensor([0, 1]))
        assert coefs.sigma[0].item() == 0.0 and coefs.sigma[1].item() > 0


def test_clipping_bounds_x0() -> None:
    s = make_schedule()
    coefs = ChainTables(s, VarianceType.FIXED_SMALL, clip=True).coefficients(torch.tensor([0]))
    # at t = 1 with no noise, x_0 = posterior mean = clipped x0 (coef2 ~ 0 at t=1)
    out, _ = reverse_step(torch.full((1, 1, 2, 2), 5.0), torch.zeros(1, 1, 2, 2), coefs, torch.zeros(1, 1, 2, 2))
    assert out.max().item() <= 1.0 + 1e-6


def test_coefficients_of_mixed_batch() -> None:
    tables = ChainTables(make_schedule(), VarianceType.FIXED_SMALL)
    mixed = tables.coefficients(torch.tensor([999, 0, 500]))
    parts = [tables.coefficients(torch.tensor([t])) for t in (999, 0, 500)]
    assert torch.equal(StepCoefficients.cat(parts).stacked(), mixed.stacked())


def test_seed_rule() -> None:
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # published first output of SplitMix64 seeded with 0
    assert image_seeds(7, 3) == [image_seed(7, 0), image_seed(7, 1), image_seed(7, 2)]
    assert len(set(image_seeds(7, 1000))) == 1000
    with pytest.raises(ValueError):
        image_seed(2**63, 0)
    with pytest.raises(ValueError):
        image_seed(-1, 0)


def test_sample_is_batch_invariant(tiny_unet: torch.nn.Module) -> None:
    s = make_schedule("linear", 1000)
    shape = (1, 8, 8)
    with torch.inference_mode():
        four = sample(tiny_unet, s, seeds_to_tensor(image_seeds(7, 4)), shape, steps=20)
        one = sample(tiny_unet, s, seeds_to_tensor(image_seeds(7, 1)), shape, steps=20)
        third = sample(tiny_unet, s, seeds_to_tensor(image_seeds(7, 1, first=2)), shape, steps=20)
        again = sample(tiny_unet, s, seeds_to_tensor(image_seeds(7, 4)), shape, steps=20)
    assert torch.equal(four, again)
    assert (four[0] - one[0]).abs().max().item() < BATCH_ROUNDING
    assert (four[2] - third[0]).abs().max().item() < BATCH_ROUNDING
    assert (four[0] - four[1]).abs().max().item() > 0.1
    assert four.min() >= -1 and four.max() <= 1


# --- the same chain as diffusers' DDPMScheduler ------------------------------------------------


def _save_diffusers_dir(tmp_path: Path, scheduler_config: dict) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **scheduler_config}))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return tmp_path


@pytest.mark.parametrize(
    ("variance_type", "clip", "num_train", "steps"),
    # full chains (S = T) on a short T keep the test fast; one respaced chain on the paper's T = 1000
    [("fixed_small", True, 100, 100), ("fixed_large", False, 100, 100), ("fixed_large", True, 100, 100), ("fixed_small", True, 1000, 40)],
)
def test_chain_matches_diffusers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variance_type: str, clip: bool, num_train: int, steps: int
) -> None:
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    config = {"num_train_timesteps": num_train, "beta_schedule": "linear", "variance_type": variance_type, "clip_sample": clip}
    model = load_model_source(_save_diffusers_dir(tmp_path, config))
    assert model.source == "diffusers" and model.image_shape == (1, 8, 8)
    assert model.variance_type.value == variance_type and model.clip_denoised == clip

    seeds = seeds_to_tensor(image_seeds(3, 2))
    with torch.inference_mode():
        ours = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=steps,
                      variance_type=model.variance_type, clip_denoised=model.clip_denoised)  # fmt: skip

        # diffusers' loop (what DDPMPipeline does) over the same timesteps, fed the same x_T and z
        chain = respace_steps(model.schedule, steps)
        scheduler = diffusers.DDPMScheduler(**config)
        scheduler.set_timesteps(timesteps=[int(t) for t in chain.timesteps[::-1]])
        current: dict[str, int] = {}

        def same_noise(shape: tuple[int, ...], **_: object) -> torch.Tensor:
            return sample_noise(seeds, current["t"] + 1, tuple(shape[1:]))

        monkeypatch.setattr(ddpm_module, "randn_tensor", same_noise)
        x = sample_noise(seeds, 0, model.image_shape)
        for t in scheduler.timesteps:
            current["t"] = int(t)
            eps = model.eps_model(x, t.repeat(2))
            x = scheduler.step(eps, t, x).prev_sample
    assert ours.shape == x.shape
    # float32 rounding only (diffusers derives its coefficients in float32, we in float64), amplified
    # by the random network over the chain; a single step agrees to ~1e-6 (test below). The unclipped
    # chain can grow far past [-1, 1], so the bound is relative.
    err = (ours - x).abs().max().item() / max(1.0, x.abs().max().item())
    assert err < 3e-4, err
    assert (ours[0] - ours[1]).abs().max().item() > 0.05


def test_diffusers_dir_errors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from ddpm.checkpoint import CheckpointError

    _save_diffusers_dir(tmp_path, {"num_train_timesteps": 1000, "prediction_type": "v_prediction"})
    with pytest.raises(CheckpointError, match="prediction_type"):
        load_model_source(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model_source(tmp_path / "nope")
    zero_snr = tmp_path / "zero-snr"
    _save_diffusers_dir(zero_snr, {"num_train_timesteps": 1000, "rescale_betas_zero_snr": True})
    with pytest.raises(CheckpointError, match="rescale_betas_zero_snr"):  # accepted silently before: wrong betas
        load_model_source(zero_snr)
    huge = _save_diffusers_dir(tmp_path / "huge", {"num_train_timesteps": 10**9})  # was killed for memory (the schedule's arrays)
    with pytest.raises(CheckpointError, match=r"scheduler_config.json: num_timesteps must be an integer in 1..100000, got 1000000000"):
        load_model_source(huge)
    diverged = _save_diffusers_dir(tmp_path / "diverged", {"num_train_timesteps": 1000})
    weights = next((diverged / "unet").glob("*.safetensors"))
    state = load_file(weights)
    save_file({**state, "conv_in.bias": state["conv_in.bias"] * float("nan")}, weights)
    with pytest.raises(CheckpointError, match=r"unet: 1 tensor holds NaN or infinity \(conv_in.bias first\)"):  # was served: NaN images
        load_model_source(diverged)


def test_noise_for_x_T_is_standard_normal() -> None:
    z = sample_noise(seeds_to_tensor(image_seeds(0, 64)), 0, (3, 32, 32)).numpy()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert np.isfinite(z).all()


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
def test_single_step_matches_diffusers(monkeypatch: pytest.MonkeyPatch, variance_type: str, clip: bool) -> None:
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type, clip_sample=clip)
    scheduler.set_timesteps(1000)
    tables = ChainTables(make_schedule("linear", 1000), VarianceType(variance_type), clip=clip)
    gen = torch.Generator().manual_seed(1)
    for t in [999, 600, 10, 1, 0]:
        x, eps, z = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *_, **__: z)  # noqa: B023
        theirs = scheduler.step(eps, t, x).prev_sample
        coefs = tables.coefficients(torch.tensor([t, t]))
        ours, _ = reverse_step(x, eps, coefs, z)
        truth, _ = reverse_step(x.double(), eps.double(), _float64(t, variance_type, clip), z.double())
        # ours is float32-exact against float64. diffusers derives 1 - abar_t in float32 from a float32
        # abar_t: at t = 1 (abar = 0.9997) that cancellation leaves ~3e-4 relative error in its
        # coefficients, measured here as up to 1.4e-4 in x_{t-1}; at large t it agrees to ~5e-7.
        assert (ours.double() - truth).abs().max().item() < 2e-6
        assert (ours - theirs).abs().max().item() < (3e-4 if t < 20 else 2e-6)


def _float64(t: int, variance_type: str, clip: bool) -> StepCoefficients:
    """The coefficients of Eq. 11 (or Eq. 7 when clipping) at t, in float64 from the schedule's arrays."""
    s = make_schedule("linear", 1000)
    sigma = 0.0 if t == 0 else math.sqrt(s.variance(VarianceType(variance_type))[t])
    p, q = math.sqrt(1 / s.alphas_cumprod[t]), math.sqrt(1 / s.alphas_cumprod[t] - 1)
    if clip:
        a, d, b = s.posterior_mean_coef2[t], 0.0, s.posterior_mean_coef1[t]
    else:
        a, d, b = 1 / math.sqrt(s.alphas[t]), -s.betas[t] / math.sqrt(1 - s.alphas_cumprod[t]) / math.sqrt(s.alphas[t]), 0.0
    values = [p, q, float(clip), a, d, b, 0.0, sigma]
    return StepCoefficients(*(torch.tensor([v, v], dtype=torch.float64) for v in values))
