"""The noise schedule: the paper's linear betas, the cosine closed form, abar as a product, the posterior
by Bayes' rule, the variance choices, immutability and the float32 view."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddpm.respace import respace, respace_steps, spaced_timesteps
from ddpm.schedule import NoiseSchedule, VarianceType, make_schedule


@pytest.fixture(params=["linear", "cosine"])
def schedule(request: pytest.FixtureRequest) -> NoiseSchedule:
    return make_schedule(request.param, 1000)


def test_linear_betas_are_the_papers() -> None:
    s = make_schedule("linear", 1000)
    assert s.betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert s.betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.allclose(np.diff(s.betas), (0.02 - 1e-4) / 999, rtol=0, atol=1e-15)


def test_alphas_cumprod_is_a_product(schedule: NoiseSchedule) -> None:
    running = 1.0
    for t in range(schedule.num_timesteps):
        running *= 1.0 - float(schedule.betas[t])
        assert schedule.alphas_cumprod[t] == pytest.approx(running, rel=1e-12)
    assert np.allclose(schedule.sqrt_alphas_cumprod**2, schedule.alphas_cumprod, rtol=1e-12)
    assert np.allclose(schedule.sqrt_one_minus_alphas_cumprod**2, 1 - schedule.alphas_cumprod, rtol=1e-12)


def test_posterior_matches_bayes_rule(schedule: NoiseSchedule) -> None:
    """Eq. 6-7 from the product of q(x_t | x_{t-1}) and q(x_{t-1} | x_0), derived independently."""
    for t in [1, 2, 10, 500, 999]:
        abar_prev = float(schedule.alphas_cumprod[t - 1])
        alpha, beta = float(schedule.alphas[t]), float(schedule.betas[t])
        precision = 1 / (1 - abar_prev) + alpha / beta
        var = 1 / precision
        assert schedule.posterior_variance[t] == pytest.approx(var, rel=1e-10)
        assert schedule.posterior_mean_coef1[t] == pytest.approx(var * math.sqrt(abar_prev) / (1 - abar_prev), rel=1e-10)
        assert schedule.posterior_mean_coef2[t] == pytest.approx(var * math.sqrt(alpha) / beta, rel=1e-10)
    assert schedule.posterior_variance[0] == 0.0
    assert schedule.posterior_log_variance_clipped[0] == pytest.approx(math.log(schedule.posterior_variance[1]))


def test_cosine_follows_its_closed_form() -> None:
    s = make_schedule("cosine", 1000)

    def f(t: float) -> float:
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    unclipped = s.betas < 0.999
    ts = np.nonzero(unclipped)[0][:900]
    for t in ts[::50]:
        assert s.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max() <= 0.999
    assert s.betas[-1] == pytest.approx(0.999)


def test_variance_choices(schedule: NoiseSchedule) -> None:
    assert np.array_equal(schedule.variance(VarianceType.FIXED_LARGE), schedule.betas)
    assert np.array_equal(schedule.variance(VarianceType.FIXED_SMALL), schedule.posterior_variance)
    # beta_tilde_t <= beta_t (Sec. 3.2: the two are the upper and lower bounds)
    assert (schedule.posterior_variance <= schedule.betas + 1e-15).all()


def test_schedule_is_immutable(schedule: NoiseSchedule) -> None:
    with pytest.raises(ValueError):
        schedule.betas[0] = 0.5
    with pytest.raises(AttributeError):
        schedule.betas = np.ones(3)  # type: ignore[misc]


def test_float32_view(schedule: NoiseSchedule) -> None:
    t = schedule.tensor("alphas_cumprod")
    assert str(t.dtype) == "torch.float32"
    assert np.allclose(t.numpy(), schedule.alphas_cumprod.astype(np.float32), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [np.array([]), np.array([0.0, 0.1]), np.array([0.1, 1.5])])
def test_invalid_betas(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        NoiseSchedule.from_betas(bad)


def test_respace_full_chain_is_the_original(schedule: NoiseSchedule) -> None:
    full = respace(schedule, np.arange(1000))
    assert np.allclose(full.betas, schedule.betas, rtol=1e-10, atol=1e-15)
    assert respace_steps(schedule, 1000) is schedule


@pytest.mark.parametrize("steps", [1, 2, 10, 50, 999])
def test_respaced_chain_keeps_marginals(schedule: NoiseSchedule, steps: int) -> None:
    ts = spaced_timesteps(1000, steps)
    assert len(ts) == steps and ts[-1] == 999 and (np.diff(ts) > 0).all()
    r = respace_steps(schedule, steps)
    assert np.array_equal(r.timesteps, ts)
    assert np.allclose(r.alphas_cumprod, schedule.alphas_cumprod[ts], rtol=1e-10)


@pytest.mark.parametrize("steps", [0, 1001, -3])
def test_respace_rejects_bad_steps(steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        spaced_timesteps(1000, steps)


def test_matches_diffusers_scheduler() -> None:
    diffusers = pytest.importorskip("diffusers")
    for ours, theirs in [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]:
        s = make_schedule(ours, 1000)
        d = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
        assert np.allclose(d.betas.numpy(), s.betas, rtol=1e-5, atol=1e-7)
        assert np.allclose(d.alphas_cumprod.numpy(), s.alphas_cumprod, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t", [21, 50, 100, 250, 1000, 4000])
def test_linear_endpoints_scale_with_t(t: int) -> None:
    """The paper's 1e-4..0.02 are for T = 1000; scaled by 1000/T the chain ends near pure noise at any T
    (unscaled, T = 100 ends at abar_T = 0.36: x_T would carry a third of the image)."""
    s = make_schedule("linear", t)
    assert s.betas[0] == pytest.approx(1e-4 * 1000 / t) and s.betas[-1] == pytest.approx(0.02 * 1000 / t)
    assert s.alphas_cumprod[-1] < 1e-4
    unscaled = make_schedule("linear", 100, beta_start=1e-4, beta_end=0.02)  # explicit endpoints are kept
    assert unscaled.alphas_cumprod[-1] == pytest.approx(0.364, abs=0.01)


def test_linear_refuses_t_whose_scaled_betas_reach_1() -> None:
    with pytest.raises(ValueError, match="T > 20"):
        make_schedule("linear", 20)
    assert make_schedule("cosine", 10).num_timesteps == 10
