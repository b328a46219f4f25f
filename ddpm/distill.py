"""Progressive distillation (Salimans & Ho, ICLR 2022, Algorithm 2): a student that takes two of its
teacher's DDIM steps in one, halved round by round.

Round 1's teacher is a trained model running DDIM (eta 0) over 2N trailing timesteps; its student, started
from the teacher's weights, learns N steps over every other of those timesteps (trailing spacing nests:
``spaced_timesteps(T, N)`` is ``spaced_timesteps(T, 2N)[1::2]``); the student of each round is the next
round's teacher, until N = ``student_steps``. For z_t at a student timestep t, with t' and t'' the next
two teacher timesteps (t'' = clean data after the last one), alpha = sqrt(abar), sigma = sqrt(1 - abar):

    teacher:  z_t' = alpha_t' x0_hat(z_t) + sigma_t' eps_hat(z_t),  z_t'' likewise from z_t'      (DDIM Eq. 12, eta 0)
    target:   x~ = (z_t'' - sigma_t''/sigma_t z_t) / (alpha_t'' - sigma_t''/sigma_t alpha_t)      (Alg. 2: one DDIM step lands on z_t'')
    loss:     max(SNR_t, 1) || x0_hat_student(z_t) - x~ ||^2                                      (truncated SNR weighting, Sec. 4)

The teacher's x0_hat is clipped to [-1, 1] and its direction term uses its own eps, as the served DDIM
chain does (``ddpm.samplers.ddim.ddim_table``), so the target is what the served teacher chain computes. The
student predicts v (``ddpm.v_prediction``): at t = T an eps-student's x0_hat = (z - sigma eps)/alpha would
multiply its error by 1/alpha_T ~ 160. Round 1 starts the v-student from the eps-teacher's weights (the
network's features carry over; its output learns the new meaning).

A run directory holds ``state.pt`` (resumable: the round, its step, weights, optimiser and RNG states, the
losses), ``rounds.jsonl`` (one line per finished round: loss, seconds, quality) and ``steps_N/`` for each
finished round: a model directory (prediction v, ``distilled_chain`` ddim N trailing) that loads and serves
like any model.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.atomic_file import write_text
from ddpm.checkpoint import ModelCard, atomic_write, load_model, read_card, record_quality, save_model
from ddpm.cpu_quota import set_torch_threads
from ddpm.data import check_folder_reading, load_labelled
from ddpm.model_facts import weights_sha256
from ddpm.respace import spaced_timesteps
from ddpm.run_changes import changed_flags, data_facts, refusal, refuse_other_data
from ddpm.run_state import load_run_state
from ddpm.train import StopFlag, finite_loss, q_sample, run_stops
from ddpm.unet import UNet
from ddpm.v_prediction import eps_from_v, x0_from_v

SPACING = "trailing"  # the only spacing whose grids nest when N halves


@dataclass(frozen=True)
class DistillConfig:
    teacher: str  # round 1's teacher: a ddpm-serve model directory (eps- or v-prediction)
    teacher_steps: int = 16  # round 1's teacher chain: DDIM (eta 0), this many trailing steps
    student_steps: int = 4  # the last round's student
    round_steps: int = 1000  # optimiser steps per round
    batch_size: int = 64
    lr: float = 2e-4  # Adam; warmed up over the first warmup_steps of a round, then linearly to 0 at its end (Sec. 4)
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    data: str = "mnist"
    checkpoint_every: int = 100
    eval_n: int = 0  # images of the quality row written per round (ddpm eval's figures; 0: none)
    threads: int = 0
    fit: str = "stretch"  # as ddpm train's (ddpm/data.py)
    background: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        check_folder_reading(self.fit, self.background)
        if self.eval_n:  # found after the first round's training before
            from ddpm.evaluate import reference_size_problem

            problem = reference_size_problem(self.eval_n)
            if problem:
                raise ValueError(f"--eval-n {self.eval_n}: {problem} (0: no quality rows)")

    def rounds(self) -> list[int]:
        """The student steps of each round: teacher_steps/2, /4, ... student_steps."""
        n, out = self.teacher_steps, []
        while n > self.student_steps:
            if n % 2:
                raise ValueError(f"teacher_steps {self.teacher_steps} must be student_steps {self.student_steps} times a power of 2")
            n //= 2
            out.append(n)
        if n != self.student_steps or not out:
            raise ValueError(f"teacher_steps {self.teacher_steps} must be student_steps {self.student_steps} times a power of 2 (>= 2)")
        return out


def nested_grids(num_timesteps: int, student_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's 2N and the student's N trailing timesteps (increasing); the student's are every other."""
    teacher = spaced_timesteps(num_timesteps, 2 * student_steps, SPACING)
    student = spaced_timesteps(num_timesteps, student_steps, SPACING)
    if not (teacher[1::2] == student).all():
        raise ValueError(f"trailing grids of {student_steps} and {2 * student_steps} steps over T = {num_timesteps} do not nest")
    return teacher, student


def predict(model: torch.nn.Module, prediction: str, z: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
            clip: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(x0_hat, eps_hat) of an eps- or v-prediction U-Net at z_t; x0_hat clipped to [-1, 1] if ``clip``."""
    out = model(z, t)
    if prediction == "v":
        x0, eps = x0_from_v(z, out, alpha, sigma), eps_from_v(z, out, alpha, sigma)
    else:
        x0, eps = (z - sigma * out) / alpha, out  # Eq. 15 solved for x_0
    return (x0.clamp(-1.0, 1.0) if clip else x0), eps


class DistillTargets:
    """The two-teacher-step targets of one round (student steps N): timesteps and alpha/sigma per position."""

    def __init__(self, abar: np.ndarray, student_steps: int, device: torch.device) -> None:
        teacher, student = nested_grids(len(abar), student_steps)
        mid = teacher[0::2]  # the teacher timestep between a student timestep and the next one down
        end_abar = np.append(1.0, abar[teacher[1::2][:-1]])  # the next student timestep; clean data (abar 1) after the last

        def column(values: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)

        self.t, self.t_mid = column(student, torch.long), column(mid, torch.long)
        self.alpha, self.sigma = column(np.sqrt(abar[student])), column(np.sqrt(1.0 - abar[student]))
        self.alpha_mid, self.sigma_mid = column(np.sqrt(abar[mid])), column(np.sqrt(1.0 - abar[mid]))
        self.alpha_end, self.sigma_end = column(np.sqrt(end_abar)), column(np.sqrt(1.0 - end_abar))
        self.weight = column(np.maximum(abar[student] / (1.0 - abar[student]), 1.0))  # max(SNR, 1)

    def target(self, teacher: torch.nn.Module, prediction: str, z: torch.Tensor, k: torch.Tensor, clip: bool) -> torch.Tensor:
        """x~ for z at student positions k (B,): the x0 whose one DDIM step reaches the teacher's two."""
        b = (-1, 1, 1, 1)
        a, s = self.alpha[k].view(b), self.sigma[k].view(b)
        x0, eps = predict(teacher, prediction, z, self.t[k], a, s, clip)
        am, sm = self.alpha_mid[k].view(b), self.sigma_mid[k].view(b)
        z_mid = am * x0 + sm * eps  # DDIM Eq. 12, eta 0
        x0, eps = predict(teacher, prediction, z_mid, self.t_mid[k], am, sm, clip)
        ae, se = self.alpha_end[k].view(b), self.sigma_end[k].view(b)
        z_end = ae * x0 + se * eps
        return (z_end - se / s * z) / (ae - se / s * a)


class Distiller:
    def __init__(self, config: DistillConfig, run_dir: str | Path, *, device: str | None = None, command: str | None = None) -> None:
        self.config = config
        self.rounds = config.rounds()
        self.run_dir = Path(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.command = command or " ".join(["ddpm", *sys.argv[1:]])
        self.threads_note = set_torch_threads(config.threads)  # --threads 0: PyTorch's default within a cgroup's CPU quota
        self.teacher_card = read_card(config.teacher)  # its weights load with each round's teacher (_start_round)
        self.teacher_sha256 = weights_sha256(Path(config.teacher))  # what round 1 distils: a resume in it checks it still is
        if self.teacher_card.unet.num_classes:
            raise ValueError("distilling a class-conditional model is not supported (its guidance doubles the teacher's calls)")
        if self.teacher_card.distilled_chain is not None:
            raise ValueError(f"{config.teacher} is already distilled; give its run's --teacher-steps instead")
        self.schedule = self.teacher_card.schedule()
        if config.teacher_steps > self.schedule.num_timesteps:  # said "steps must be in 1..1000, got 2048", naming no flag
            raise ValueError(f"--teacher-steps {config.teacher_steps}: the teacher has T = {self.schedule.num_timesteps} timesteps")
        self.abar = self.schedule.alphas_cumprod
        unet = self.teacher_card.unet
        dataset = load_labelled(config.data, unet.in_channels, unet.image_size, config.fit, config.background)
        self.data = dataset.images.to(self.device)
        self.data_facts = data_facts(len(dataset.images), dataset.source_sha256)
        self.data_notes = dataset.notes  # what reading the images changed (ddpm.data.FolderNotes): said at start, on the card
        self.sqrt_abar = self.schedule.tensor("sqrt_alphas_cumprod", self.device)
        self.sqrt_1m_abar = self.schedule.tensor("sqrt_one_minus_alphas_cumprod", self.device)
        self.student = UNet(self.teacher_card.unet).to(self.device).train()  # weights: the teacher's (a fresh round) or the saved state
        self.gen = torch.Generator(device="cpu").manual_seed(config.seed)
        torch.manual_seed(config.seed)
        self.round = 0  # index into self.rounds
        self.step = 0  # optimiser steps done in this round
        self.saved_at: str | None = None  # where the run directory's checkpoint is (what a stopped run keeps)
        self.losses: dict[int, list[float]] = {}
        self.seconds: dict[int, float] = {}
        self.opt = torch.optim.Adam(self.student.parameters(), lr=config.lr)
        self._resume()
        self._start_round(fresh=self.step == 0)

    # --- state ---------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.pt"

    @property
    def done(self) -> bool:
        return self.round >= len(self.rounds)

    def round_dir(self, steps: int) -> Path:
        return self.run_dir / f"steps_{steps}"

    def _resume(self) -> None:
        if not self.state_path.exists():
            return
        state = load_run_state(self.state_path, self.device)
        saved = {**asdict(DistillConfig(self.config.teacher)), **state["config"]}  # a state older than a field: its default
        changed = changed_flags(saved, asdict(self.config), ("threads", "eval_n", "checkpoint_every"))
        if changed:
            raise ValueError(refusal(self.state_path, "distilled", changed))
        refuse_other_data(self.state_path, "distilled", self.config.data, state.get("data"), self.data_facts)
        was = state.get("teacher_sha256")
        if state["round"] == 0 and was not in (None, self.teacher_sha256):  # (later rounds learn from the run's own students)
            raise ValueError(f"{self.state_path} was distilled from --teacher {self.config.teacher} with weights sha256 {was[:12]}; "
                             f"it holds {self.teacher_sha256[:12]} now: resume it with the same teacher, or give a new --run-dir "
                             "for another run")  # fmt: skip
        self.round, self.step = state["round"], state["step"]
        self.saved_at = self._position()
        self.losses, self.seconds = state["losses"], state["seconds"]
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["opt"])

    def _start_round(self, fresh: bool) -> None:
        """Load this round's teacher (round 1: the given model; later: the last round's student); a fresh
        round starts its student from the teacher's weights with a new optimiser."""
        if self.done:
            return
        steps = self.rounds[self.round]
        if self.round == 0:
            teacher, card = load_model(self.config.teacher, self.device)
        else:
            teacher, card = load_model(self.round_dir(self.rounds[self.round - 1]), self.device)
        self.teacher, self.teacher_prediction = teacher.eval().requires_grad_(False), card.prediction
        self.targets = DistillTargets(self.abar, steps, self.device)
        if fresh:
            self.student.load_state_dict(teacher.state_dict())
            self.opt = torch.optim.Adam(self.student.parameters(), lr=self.config.lr)
        self.losses.setdefault(steps, [])
        self.seconds.setdefault(steps, 0.0)

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "config": asdict(self.config),
            "round": self.round,
            "step": self.step,
            "student": self.student.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "losses": self.losses,
            "seconds": self.seconds,
            "data": self.data_facts,
            "teacher_sha256": self.teacher_sha256,
        }
        atomic_write(self.state_path, lambda path: torch.save(state, path))
        self.saved_at = self._position()

    def _position(self) -> str:
        """Where the run is, in words (what a stopped run's checkpoint holds)."""
        steps = self.rounds[min(self.round, len(self.rounds) - 1)]
        return f"step {self.step} of the {2 * steps}->{steps} round" if not self.done else "its last round's end"

    def model_card(self, steps: int) -> ModelCard:
        t = self.teacher_card
        losses = self.losses[steps]
        tail = losses[-100:]
        return ModelCard(
            unet=t.unet,
            schedule_kind=t.schedule_kind,
            num_timesteps=t.num_timesteps,
            schedule_params=dict(t.schedule_params),
            variance_type=t.variance_type,
            clip_denoised=t.clip_denoised,
            prediction="v",
            distilled_chain={"sampler": "ddim", "steps": steps, "timestep_spacing": SPACING},
            training={
                "command": self.command,
                "method": "progressive distillation (Salimans & Ho 2022), v-prediction, truncated-SNR weighting",
                "teacher": str(self.config.teacher),  # round 1's; each later round's teacher is the round before's student
                "teacher_sha256": self.teacher_sha256,
                "round_teacher": str(self.config.teacher) if steps == self.rounds[0] else str(self.round_dir(2 * steps)),
                "teacher_chain": {"sampler": "ddim", "steps": 2 * steps, "timestep_spacing": SPACING},
                "rounds": {
                    str(n): {"steps": len(self.losses[n]), "seconds": round(self.seconds[n], 1)} for n in self.rounds if n in self.losses
                },
                "data": self.config.data,
                "data_images": self.data_facts["images"],
                "data_sha256": self.data_facts["sha256"],
                **({"data_notes": list(self.data_notes)} if self.data_notes else {}),
                "seed": self.config.seed,
                "batch_size": self.config.batch_size,
                "lr": self.config.lr,
                "final_loss_mean_100": round(sum(tail) / len(tail), 6) if tail else None,
                "device": str(self.device),
                "torch": torch.__version__,
            },
        )

    # --- training --------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        cfg = self.config
        return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps)) * max(0.0, 1.0 - step / cfg.round_steps)

    def train_step(self) -> float:
        cfg, targets = self.config, self.targets
        idx = torch.randint(0, len(self.data), (cfg.batch_size,), generator=self.gen)
        k = torch.randint(0, len(targets.t), (cfg.batch_size,), generator=self.gen).to(self.device)  # student positions
        noise = torch.randn((cfg.batch_size, *self.data.shape[1:]), generator=self.gen).to(self.device)
        z = q_sample(self.sqrt_abar, self.sqrt_1m_abar, self.data[idx.to(self.device)], targets.t[k], noise)  # Eq. 4
        with torch.no_grad():
            target = targets.target(self.teacher, self.teacher_prediction, z, k, self.teacher_card.clip_denoised)
        b = (-1, 1, 1, 1)
        x0 = x0_from_v(z, self.student(z, targets.t[k]), targets.alpha[k].view(b), targets.sigma[k].view(b))
        loss = (targets.weight[k].view(b) * (x0 - target) ** 2).mean()
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        value = finite_loss(loss, torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip), self.step)
        self.opt.step()
        self.step += 1
        return value

    def finish_round(self) -> Path:
        """Export this round's student as a model directory, measure it, and move to the next round."""
        steps = self.rounds[self.round]
        card = self.model_card(steps)
        out = save_model(self.round_dir(steps), self.student, card)
        row: dict[str, Any] = {
            "student_steps": steps,
            "teacher_steps": 2 * steps,
            "optimiser_steps": len(self.losses[steps]),
            "seconds": round(self.seconds[steps], 1),
            "loss_mean_100": card.training["final_loss_mean_100"],
        }
        if self.config.eval_n:
            row["quality"] = self.measure(out)
        rounds = self.run_dir / "rounds.jsonl"
        text = (rounds.read_text(encoding="utf-8") if rounds.exists() else "") + json.dumps(row) + "\n"
        write_text(rounds, text)  # whole lines, or the file as it was
        self.round += 1
        self.step = 0
        self._start_round(fresh=True)
        self.save()
        return out

    def measure(self, model_dir: Path) -> dict[str, Any]:
        """``ddpm eval -n eval_n --seed 0`` of a round's student on its own chain, recorded in its config."""
        from ddpm.classifier import load_classifier
        from ddpm.evaluate import evaluate
        from ddpm.model_source import load_model_source
        from ddpm.offline_sampler import sample
        from ddpm.seeding import image_seeds
        from ddpm.shipped_models import DEFAULT_CLASSIFIER
        from kernels.philox import seeds_to_tensor

        model = load_model_source(model_dir, self.device)
        chain = model.distilled_chain or {}
        seeds = seeds_to_tensor(image_seeds(0, self.config.eval_n), self.device)
        with torch.inference_mode():
            images = sample(model.eps_model, model.schedule, seeds, model.image_shape, steps=chain["steps"], sampler="ddim",
                            spacing=SPACING, clip_denoised=model.clip_denoised, device=self.device)  # fmt: skip
        report = {"command": f"ddpm eval --model {model_dir} -n {self.config.eval_n} --seed 0 (the model's own chain)",
                  "seed": 0, "steps": chain["steps"], "sampler": "ddim", "timestep_spacing": SPACING,
                  **evaluate(load_classifier(DEFAULT_CLASSIFIER), images.cpu())}  # fmt: skip
        record_quality(model_dir, report)
        return report

    def train(self, progress: bool = True, max_steps: int | None = None) -> None:
        """Run the rounds left; ``max_steps``: stop (and save) after this many optimiser steps of this call."""
        from tqdm import tqdm

        budget = max_steps
        with run_stops(self.run_dir, self.config.lr, self.config.warmup_steps, lambda: self.saved_at) as stop:
            while not self.done and not stop.requested and budget != 0:
                steps = self.rounds[self.round]
                with tqdm(total=self.config.round_steps, initial=self.step, disable=not progress, desc=f"distill {2 * steps}->{steps}",
                          dynamic_ncols=True) as bar:  # fmt: skip
                    budget = self._train_round(steps, bar, stop, budget)
                if self.step >= self.config.round_steps:
                    self.finish_round()
            self.save()  # also on SIGINT/SIGTERM/SIGHUP: the run resumes from exactly here

    def _train_round(self, steps: int, bar: Any, stop: StopFlag, budget: int | None) -> int | None:
        """Optimiser steps of this round until its end, a stop or the budget; the budget left."""
        last = time.perf_counter()
        while self.step < self.config.round_steps and not stop.requested and budget != 0:
            self.losses[steps].append(self.train_step())
            budget = None if budget is None else budget - 1
            now = time.perf_counter()
            self.seconds[steps] += now - last
            last = now
            bar.update(1)
            if self.step % 20 == 0:
                tail = self.losses[steps][-50:]
                bar.set_postfix(loss=f"{sum(tail) / len(tail):.4f}")
            if self.step % self.config.checkpoint_every == 0:
                self.save()
            last = time.perf_counter()
        return budget
