"""Progressive distillation (ddpm/distill.py): the grids nest, a student that hits its target takes the
teacher's two served DDIM steps in one (checked through the served chain, not the distiller's own
formulas), the v-prediction wrapper, exact resume, and a distilled model that serves only its own chain."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.checkpoint import CheckpointError, ModelCard, load_model, save_model
from ddpm.distill import DistillConfig, Distiller, DistillTargets, nested_grids
from ddpm.loaded_model import ChainError
from ddpm.model_facts import weights_sha256
from ddpm.model_source import load_model_source
from ddpm.offline_sampler import sample
from ddpm.schedule import make_schedule
from ddpm.train import Diverged
from ddpm.v_prediction import EpsFromV
from kernels.philox import seeds_to_tensor
from tests.tiny_model import TINY, random_tiny_unet


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 32])
def test_trailing_grids_nest(steps: int) -> None:
    teacher, student = nested_grids(1000, steps)
    assert len(teacher) == 2 * steps and teacher[-1] == student[-1] == 999
    assert set(student) <= set(teacher)


def test_rounds_halve_down_to_the_student() -> None:
    assert DistillConfig(teacher="x", teacher_steps=16, student_steps=1).rounds() == [8, 4, 2, 1]
    assert DistillConfig(teacher="x", teacher_steps=8, student_steps=4).rounds() == [4]
    for bad in ((12, 5), (4, 4), (6, 4)):
        with pytest.raises(ValueError, match="power of 2"):
            DistillConfig(teacher="x", teacher_steps=bad[0], student_steps=bad[1]).rounds()


class PerfectStudent(torch.nn.Module):
    """A student whose x0_hat is the distillation target exactly, given as eps (the served chain's input)."""

    def __init__(self, targets: DistillTargets, teacher: torch.nn.Module, prediction: str) -> None:
        super().__init__()
        self.targets, self.teacher, self.prediction = targets, teacher, prediction

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = torch.searchsorted(self.targets.t, t)
        assert torch.equal(self.targets.t[k], t), "the served chain visits the student's timesteps"
        x_target = self.targets.target(self.teacher, self.prediction, z, k, clip=False)
        b = (-1, 1, 1, 1)
        a, s = self.targets.alpha[k].view(b), self.targets.sigma[k].view(b)
        return (z - a * x_target) / s  # the eps whose x0_hat (Eq. 15) is the target


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_student_that_hits_its_target_takes_two_teacher_steps_in_one(prediction: str, steps: int) -> None:
    """The served DDIM chain of the teacher over 2N trailing steps and of the perfect student over N
    end on the same images (the identity is exact, up to float32 rounding relative to the images' scale:
    a random eps-teacher's unclipped x0_hat reaches ~470, as x0_hat at t = 999 divides by sqrt(abar) ~ 0.006)."""
    schedule = make_schedule("linear", 1000)
    unet = random_tiny_unet()
    served_teacher = EpsFromV(unet, schedule) if prediction == "v" else unet
    targets = DistillTargets(schedule.alphas_cumprod, steps, torch.device("cpu"))
    student = PerfectStudent(targets, unet, prediction)
    seeds = seeds_to_tensor(list(range(3)))
    common = dict(sampler="ddim", spacing="trailing", clip_denoised=False)
    with torch.no_grad():
        x_teacher = sample(served_teacher, schedule, seeds, (1, 8, 8), steps=2 * steps, **common)
        x_student = sample(student, schedule, seeds, (1, 8, 8), steps=steps, **common)
    scale = x_teacher.abs().max().item()
    assert scale > 0.1
    torch.testing.assert_close(x_student, x_teacher, rtol=0, atol=max(2e-6 * scale, 1e-4))  # measured: 5e-7 x scale, <= 1e-4


def test_eps_from_v_recovers_x0_and_eps() -> None:
    schedule = make_schedule("linear", 1000)
    x0, eps = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    a = torch.from_numpy(schedule.sqrt_alphas_cumprod[t.numpy()]).view(-1, 1, 1, 1)
    s = torch.from_numpy(schedule.sqrt_one_minus_alphas_cumprod[t.numpy()]).view(-1, 1, 1, 1)
    x_t, v = a * x0 + s * eps, a * eps - s * x0  # Eq. 4 and the definition of v

    class Oracle(torch.nn.Module):
        def forward(self, x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return v

    wrapped = EpsFromV(Oracle(), schedule).double()
    torch.testing.assert_close(wrapped(x_t, t), eps)


def _teacher_dir(tmp_path: Path) -> Path:
    return save_model(tmp_path / "teacher", random_tiny_unet(), ModelCard(unet=TINY, num_timesteps=1000))


def _config(teacher: Path, **kw: object) -> DistillConfig:
    base: dict[str, object] = dict(teacher=str(teacher), teacher_steps=4, student_steps=1, round_steps=6, batch_size=8, lr=1e-3,
                                   warmup_steps=2, checkpoint_every=3)  # fmt: skip
    base.update(kw)
    return DistillConfig(**base)  # type: ignore[arg-type]


def test_distillation_resumes_exactly_and_exports_each_round(tmp_path: Path) -> None:
    teacher = _teacher_dir(tmp_path)
    straight = Distiller(_config(teacher), tmp_path / "a", device="cpu")
    straight.train(progress=False)
    assert straight.done and [len(straight.losses[n]) for n in (2, 1)] == [6, 6]

    first = Distiller(_config(teacher), tmp_path / "b", device="cpu")
    first.train(progress=False, max_steps=8)  # into round 2
    resumed = Distiller(_config(teacher), tmp_path / "b", device="cpu")
    assert (resumed.round, resumed.step) == (1, 2)
    resumed.train(progress=False)
    assert resumed.losses == straight.losses
    for n in (2, 1):
        a, card = load_model(tmp_path / "a" / f"steps_{n}")
        b, _ = load_model(tmp_path / "b" / f"steps_{n}")
        for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
            assert torch.equal(pa, pb)
        assert card.prediction == "v" and card.distilled_chain == {"sampler": "ddim", "steps": n, "timestep_spacing": "trailing"}
        assert card.training["teacher_chain"]["steps"] == 2 * n
    rows = (tmp_path / "b" / "rounds.jsonl").read_text().splitlines()
    assert len(rows) == 2

    with pytest.raises(ValueError, match=r"was distilled with --round-steps \d+ \(this command: 7\): resume it with the same flags"):
        Distiller(_config(teacher, round_steps=7), tmp_path / "b", device="cpu")
    state = torch.load(tmp_path / "b" / "state.pt", weights_only=False)  # as a version before --fit and --background saved it
    for field in ("fit", "background"):
        del state["config"][field]
    torch.save(state, tmp_path / "b" / "state.pt")
    assert Distiller(_config(teacher), tmp_path / "b", device="cpu").done  # resumed (was: "--fit None (this command: stretch)")
    with pytest.raises(ValueError, match=r"was distilled with --fit stretch \(this command: crop\)"):
        Distiller(_config(teacher, fit="crop"), tmp_path / "b", device="cpu")
    with pytest.raises(ValueError, match="already distilled"):
        Distiller(_config(tmp_path / "a" / "steps_1"), tmp_path / "c", device="cpu")


def test_a_diverging_distillation_stops_and_keeps_its_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Distiller(_config(_teacher_dir(tmp_path)), tmp_path / "run", device="cpu")
    monkeypatch.setattr(d, "lr_at", lambda step: 1e-3 if step < 3 else 1e30)
    with pytest.raises(Diverged, match=r"^training diverged at step 5 .* holds its checkpoint of step 3 of the 4->2 round, whose weights"):
        d.train(progress=False)
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=False)["step"] == 3


def test_distillation_lowers_its_loss(tmp_path: Path) -> None:
    d = Distiller(_config(_teacher_dir(tmp_path), teacher_steps=2, round_steps=80, lr=2e-3), tmp_path / "run", device="cpu")
    d.train(progress=False)
    losses = d.losses[1]
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10]), (losses[:10], losses[-10:])  # measured ratio: 0.61


def _png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def distilled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distilled")
    card = ModelCard(
        unet=TINY, num_timesteps=1000, prediction="v", distilled_chain={"sampler": "ddim", "steps": 2, "timestep_spacing": "trailing"}
    )
    return save_model(root / "student", random_tiny_unet(), card)


def test_a_distilled_model_runs_its_own_chain_and_refuses_others(distilled_dir: Path) -> None:
    model = load_model_source(distilled_dir)
    assert isinstance(model.eps_model, EpsFromV) and model.distilled_chain is not None
    assert model.own_chain(None, None, None) == ("ddim", 2, "trailing")
    sampler, steps, spacing = model.own_chain(None, None, None)
    chain = model.chain(sampler, steps, spacing=spacing)
    assert (chain.sampler, chain.steps, chain.spacing) == ("ddim", 2, "trailing")
    for args, kw, field in [(("ddim", 4), {}, "steps"), (("ddpm", 2), {}, "sampler"),
                            (("ddim", 2), {"spacing": "linspace"}, "timestep_spacing"),
                            (("ddim", 2), {"strength": 0.5}, "strength"), (("ddim", 2), {"repaint": True}, "mask"),
                            (("ddim", 2), {"eta": 0.5}, "eta")]:  # fmt: skip
        with pytest.raises(ChainError, match="distilled") as err:
            model.chain(*args, **{"spacing": "trailing", **kw})
        assert err.value.field == field


def test_model_card_validates_the_prediction(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="prediction"):
        ModelCard(unet=TINY, prediction="x0")
    with pytest.raises(CheckpointError, match="distilled_chain"):
        ModelCard(unet=TINY, distilled_chain={"sampler": "ddpm", "steps": 4})


def test_the_server_answers_with_the_distilled_chain(distilled_dir: Path) -> None:
    from tests.app_client import app_client, wait_ready

    with app_client(distilled_dir, max_images_per_request=2, compile="off") as client:
        wait_ready(client)
        info = client.get("/info").json()
        assert info["model"]["distilled_chain"] == {"sampler": "ddim", "steps": 2, "timestep_spacing": "trailing"}
        assert info["model"]["prediction"] == "v"
        ok = client.post("/generate", json={"seed": 1, "batch_size": 1})
        assert ok.status_code == 200, ok.text
        assert (ok.json()["sampler"], ok.json()["steps"]) == ("ddim", 2)
        bad = client.post("/generate", json={"seed": 1, "batch_size": 1, "steps": 10})
        assert bad.status_code == 422 and "distilled" in bad.text and "steps" in bad.text
        image, mask = (_png(np.full((8, 8), 128, dtype=np.uint8)), _png(np.repeat([0, 255], 32).reshape(8, 8).astype(np.uint8)))
        for edit in ({"strength": 0.5}, {"mask": mask}):
            refused = client.post("/generate", json={"seed": 1, "batch_size": 1, "image": image, **edit})
            assert refused.status_code == 422 and "cannot edit" in refused.text, refused.text
        schedule = client.get("/schedule").json()
        assert schedule["chain"]["sampler"] == "ddim" and len(schedule["chain"]["timesteps"]) == 2


def test_a_round_one_resume_from_a_teacher_that_changed_is_refused(tmp_path: Path) -> None:
    """--teacher is a path: a teacher trained further (its run exporting into it) or replaced between a stop and the
    resume gave round 1 another teacher half-way, silently, and the card named the path as if one model taught it."""
    teacher = _teacher_dir(tmp_path)
    Distiller(_config(teacher), tmp_path / "run", device="cpu").train(progress=False, max_steps=3)  # stopped in round 1
    assert Distiller(_config(teacher), tmp_path / "run", device="cpu").teacher_sha256 == weights_sha256(teacher)
    trained_further = random_tiny_unet()
    with torch.no_grad():
        next(trained_further.parameters()).add_(0.1)
    save_model(teacher, trained_further, ModelCard(unet=TINY, num_timesteps=1000, training={"steps": 2}))
    with pytest.raises(ValueError, match=r"run/state.pt was distilled from --teacher .*teacher with weights sha256 [0-9a-f]{12}; it "
                                         r"holds [0-9a-f]{12} now: resume it with the same teacher"):  # fmt: skip
        Distiller(_config(teacher), tmp_path / "run", device="cpu")
    Distiller(_config(teacher), tmp_path / "later", device="cpu").train(progress=False, max_steps=7)  # into round 2, whose
    save_model(teacher, random_tiny_unet(), ModelCard(unet=TINY, num_timesteps=1000, training={"steps": 3}))  # teacher is round
    assert Distiller(_config(teacher), tmp_path / "later", device="cpu").round == 1  # 1's student: a changed --teacher is moot
