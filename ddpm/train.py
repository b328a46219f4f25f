"""Training by Algorithm 1 of Ho et al. 2020, with EMA, gradient clipping, checkpoints and resume.

repeat: x0 ~ q(x0); t ~ Uniform({1..T}); eps ~ N(0, I);
        gradient step on || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2   (Eq. 14)

A run directory holds ``state.pt`` (everything needed to resume: weights, EMA, optimizer, data RNG,
step, loss history), ``samples/step_NNNNNN.png`` grids, ``loss.png``, and the exported model
(``model/``: EMA weights in safetensors + config.json) written at every checkpoint.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ddpm.atomic_file import WriteError
from ddpm.checkpoint import CONFIG, ModelCard, atomic_write, save_model
from ddpm.cpu_quota import set_torch_threads
from ddpm.data import check_folder_reading, load_labelled
from ddpm.free_space import make_room
from ddpm.grid import make_grid
from ddpm.run_changes import changed_flags, data_facts, refusal, refuse_other_data
from ddpm.run_state import load_run_state
from ddpm.schedule import NoiseSchedule, VarianceType, make_schedule
from ddpm.terminal_hangup import STOP_SIGNALS, handle_unless_ignored, off_the_terminal
from ddpm.unet import UNet, UNetConfig


@dataclass(frozen=True)
class TrainConfig:
    data: str = "mnist"
    steps: int = 12000
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the paper's 0.9999 needs ~10x more steps than a CPU run has
    seed: int = 0
    schedule: str = "linear"
    num_timesteps: int = 1000
    variance_type: str = "fixed_small"
    checkpoint_every: int = 500
    sample_every: int = 1000
    sample_steps: int = 100  # respaced chain for the periodic grids (cheap on CPU)
    threads: int = 0  # torch CPU threads; 0 = PyTorch's default, capped at a cgroup's CPU quota
    unet: UNetConfig = field(default_factory=UNetConfig)
    # class-conditional training (classifier-free guidance, Ho & Salimans 2022): the U-Net takes the data's
    # labels, each replaced by the null label with probability label_dropout, so one network learns both
    # eps(x, t, y) and eps(x, t, null)
    conditional: bool = False
    label_dropout: float = 0.1
    fit: str = "stretch"  # a folder's non-square images (ddpm/data.py): stretched, or their middle square cropped
    background: str | None = None  # a folder's transparent pixels flattened onto this colour (None: as stored)

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.ema_decay <= 1:  # below 0 no average (e <- 2p - e at -1); over 1 the warm-up ramp ran silently
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        check_folder_reading(self.fit, self.background)


RESUMABLE = ("steps", "checkpoint_every", "sample_every", "sample_steps", "threads")  # what resuming may change
FLAGS = {"in_channels": "--channels", "num_classes": "the data's classes"}  # a field whose flag is not its name


def config_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """What a resumed command changes of its run (ddpm/run_changes.py), the U-Net's fields as flags of their own.
    A state older than a field has its default."""
    unet = asdict(UNetConfig.from_dict(saved.get("unet", {})))
    before = {**asdict(TrainConfig()), **{k: v for k, v in saved.items() if k != "unet"}, **unet}
    now = {k: v for k, v in asdict(config).items() if k != "unet"} | asdict(config.unet)
    if not config.conditional:  # num_classes comes from the data only in a conditional run
        now.pop("num_classes", None)
    return changed_flags(before, now, RESUMABLE, FLAGS)


def q_sample(
    schedule_sqrt_abar: torch.Tensor, schedule_sqrt_1m_abar: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a = schedule_sqrt_abar[t][:, None, None, None]  # (B,) -> (B, 1, 1, 1)
    s = schedule_sqrt_1m_abar[t][:, None, None, None]
    return a * x0 + s * noise


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: str | Path, *, device: str | None = None, command: str | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.command = command or " ".join(["ddpm", *sys.argv[1:]])
        self.threads_note = set_torch_threads(config.threads)  # --threads 0: PyTorch's default within a cgroup's CPU quota
        torch.manual_seed(config.seed)
        self.schedule: NoiseSchedule = make_schedule(config.schedule, config.num_timesteps)
        self.sqrt_abar = self.schedule.tensor("sqrt_alphas_cumprod", self.device)
        self.sqrt_1m_abar = self.schedule.tensor("sqrt_one_minus_alphas_cumprod", self.device)
        if not self.state_path.exists():  # a new run; one begun before a check resumes as it was
            config.unet.check_new()
        dataset = load_labelled(config.data, config.unet.in_channels, config.unet.image_size, config.fit, config.background)
        self.data = dataset.images.to(self.device)
        self.data_facts = data_facts(len(dataset.images), dataset.source_sha256)
        self.data_notes = dataset.notes  # what reading the images changed (ddpm.data.FolderNotes): said at start, on the card
        self.labels: torch.Tensor | None = None
        self.class_names: list[str] = []
        if config.conditional:
            if dataset.labels is None:
                raise ValueError(f"--conditional needs labelled data: {config.data} has no classes (put each class in its own sub-folder)")
            self.labels, self.class_names = dataset.labels.to(self.device), dataset.class_names
            self.config = config = replace(config, unet=replace(config.unet, num_classes=len(dataset.class_names)))
        self.model = UNet(config.unet).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.gen = torch.Generator(device="cpu").manual_seed(config.seed)
        self.step = 0
        self.saved_at: int | None = None  # the step of the run directory's checkpoint (what a stopped run keeps)
        self.losses: list[float] = []
        self.train_seconds = 0.0
        self._resume()

    # --- state -------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.pt"

    def _resume(self) -> None:
        if not self.state_path.exists():
            return
        state = load_run_state(self.state_path, self.device)
        changed = config_changes(state["config"], self.config)
        if changed:
            raise ValueError(refusal(self.state_path, "trained", changed))
        refuse_other_data(self.state_path, "trained", self.config.data, state.get("data"), self.data_facts)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.step = self.saved_at = state["step"]
        self.losses = state["losses"]
        self.train_seconds = state.get("train_seconds", 0.0)

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "losses": self.losses,
            "train_seconds": self.train_seconds,
            "data": self.data_facts,
        }
        atomic_write(self.state_path, lambda path: torch.save(state, path))
        self.saved_at = self.step
        save_model(self.run_dir / "model", self.ema, self.model_card())
        self.plot_loss()

    def model_card(self) -> ModelCard:
        cfg = self.config
        return ModelCard(
            unet=cfg.unet,
            schedule_kind=self.schedule.kind,
            num_timesteps=cfg.num_timesteps,
            schedule_params=dict(self.schedule.params),
            variance_type=VarianceType(cfg.variance_type),
            clip_denoised=True,
            class_names=self.class_names,
            training={
                "command": self.command,
                "data": cfg.data,
                "data_images": self.data_facts["images"],
                "data_sha256": self.data_facts["sha256"],
                **({"data_notes": list(self.data_notes)} if self.data_notes else {}),
                "seed": cfg.seed,
                "steps": self.step,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "ema_decay": cfg.ema_decay,
                **({"label_dropout": cfg.label_dropout} if cfg.conditional else {}),
                "train_seconds": round(self.train_seconds, 1),
                "final_loss_ema": self.smoothed_loss(),
                "device": str(self.device),
                "torch": torch.__version__,
            },
        )

    def smoothed_loss(self, window: int = 200) -> float | None:
        if not self.losses:
            return None
        tail = self.losses[-window:]
        return round(sum(tail) / len(tail), 5)

    # --- training ----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return self.config.lr * min(1.0, (step + 1) / max(1, self.config.warmup_steps))

    def train_step(self) -> float:
        cfg = self.config
        idx = torch.randint(0, len(self.data), (cfg.batch_size,), generator=self.gen)
        x0 = self.data[idx.to(self.device)]  # (B, C, H, W)
        t = torch.randint(0, cfg.num_timesteps, (cfg.batch_size,), generator=self.gen).to(self.device)
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        x_t = q_sample(self.sqrt_abar, self.sqrt_1m_abar, x0, t, noise)
        y = None
        if self.labels is not None:  # classifier-free guidance: drop each label with probability p
            drop = torch.rand((cfg.batch_size,), generator=self.gen).to(self.device) < cfg.label_dropout
            y = torch.where(drop, cfg.unet.null_label, self.labels[idx.to(self.device)])
        loss = F.mse_loss(self.model(x_t, t, y) if y is not None else self.model(x_t, t), noise)  # L_simple, Eq. 14
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        value = finite_loss(loss, torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip), self.step)
        self.opt.step()
        # EMA with warm-up: early weights are forgotten fast, later ones averaged over ~1/(1-decay) steps.
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        ema_update(self.ema, self.model, decay)
        self.step += 1
        return value

    @property
    def finished(self) -> bool:
        """At --steps already, its model exported: nothing to train or write."""
        return self.step >= self.config.steps and (self.run_dir / "model" / CONFIG).is_file()

    def train(self, progress: bool = True) -> None:
        from tqdm import tqdm

        cfg = self.config
        if self.finished:  # re-exporting the same weights wrote a card without the quality `ddpm eval --record` had put there
            return
        with run_stops(self.run_dir, cfg.lr, cfg.warmup_steps, self._checkpoint) as stop:
            with tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc="train", dynamic_ncols=True) as bar:
                self._train_steps(bar, stop)
            self.save()  # also on SIGINT/SIGTERM/SIGHUP: the run resumes from exactly here

    def _checkpoint(self) -> str | None:
        """Which step the run directory's checkpoint holds (None: nothing saved yet)."""
        return None if self.saved_at is None else f"step {self.saved_at}"

    def _train_steps(self, bar: Any, stop: StopFlag) -> None:
        """Optimiser steps to --steps or a stop, with the sample grids and checkpoints on their schedules."""
        cfg = self.config
        last = time.perf_counter()
        while self.step < cfg.steps and not stop.requested:
            self.losses.append(self.train_step())
            now = time.perf_counter()
            self.train_seconds += now - last
            last = now
            bar.update(1)
            if self.step % 20 == 0:
                bar.set_postfix(loss=f"{self.smoothed_loss(100):.4f}")
            if self.step % cfg.sample_every == 0:
                self.write_samples()
            if self.step % cfg.checkpoint_every == 0:
                self.save()
            last = time.perf_counter()  # sampling and saving are not training time

    def write_samples(self, n: int = 36) -> Path:
        from ddpm.offline_sampler import sample
        from ddpm.seeding import image_seeds
        from kernels.philox import seeds_to_tensor

        seeds = seeds_to_tensor(image_seeds(0, n), self.device)
        eps_model = self.ema
        if self.class_names:  # one row per class (n = 6 per row, classes cycling), conditional eps (guidance 0)
            k = len(self.class_names)
            labels = torch.arange(n, device=self.device) // 6 % k

            def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self.ema(x, t, labels[: x.shape[0]])

        with torch.inference_mode():
            x = sample(
                eps_model,
                self.schedule,
                seeds,
                ModelCard(unet=self.config.unet).image_shape,
                steps=min(self.config.sample_steps, self.config.num_timesteps),  # --num-timesteps 50: the default 100 failed
                variance_type=VarianceType(self.config.variance_type),
                device=self.device,
            )
        path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: make_grid(x, ncols=6).save(tmp, format="PNG"))
        return path

    def plot_loss(self) -> None:
        if not self.losses:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        window = max(1, min(200, len(self.losses) // 20))
        kernel = torch.ones(window) / window
        smooth = F.conv1d(torch.tensor(self.losses)[None, None], kernel[None, None]).flatten().tolist()
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(self.losses, alpha=0.25, lw=0.5, label="loss")
        ax.plot(range(window - 1, window - 1 + len(smooth)), smooth, lw=1.5, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("L_simple (MSE of eps)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        try:
            atomic_write(self.run_dir / "loss.png", lambda tmp: fig.savefig(tmp, format="png"))
        finally:
            plt.close(fig)


class Diverged(RuntimeError):
    """The loss or its gradient stopped being finite: the run stops before the step that would make its weights NaN (a
    run that went on wrote NaN weights over its good checkpoint at every save, to the end)."""


def finite_loss(loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> float:
    """The step's loss as a number (one read of the device for it and the gradient's norm), or Diverged where either is
    not finite: a gradient can overflow while the loss is finite, and clipping it then makes every weight NaN."""
    value, norm = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()
    if not (math.isfinite(value) and math.isfinite(norm)):
        raise Diverged(f"training diverged at step {step + 1} (the loss was {value:g}, the gradient's norm {norm:g})")
    return value


def kept(run_dir: Path, checkpoint: str | None) -> str:
    """What a diverged run's directory still holds (``checkpoint``: of which step), and why resuming it does not help."""
    if checkpoint is None:
        return f"Nothing was saved in {run_dir}: start again with a lower --lr"
    return (f"{run_dir} holds its checkpoint of {checkpoint}, whose weights are finite, but a resume repeats the run exactly "
            "and would diverge again: start a new run with a lower --lr")


def resumable(run_dir: Path, checkpoint: str | None) -> str:
    """What a run directory holds after a write failed (``checkpoint``: of which step), and how to go on."""
    if checkpoint is None:
        return f"Nothing was saved in {run_dir}: {make_room()} and start again"
    return f"{run_dir} holds its checkpoint of {checkpoint}, whole: {make_room()} and run the same command to resume from it"


@contextmanager
def run_stops(run_dir: Path, lr: float, warmup_steps: int, checkpoint: Callable[[], str | None]) -> Iterator[StopFlag]:
    """A run's loop (training, distillation): SIGINT/SIGTERM/SIGHUP ask it to stop (the StopFlag yielded), and the two stops a
    plain resume does not undo say what the run directory holds (``checkpoint``: of which step) and what to do."""
    stop = StopFlag()
    try:
        yield stop
    except Diverged as exc:  # nothing saved: the run directory keeps its last checkpoint, whose weights are finite
        raise Diverged(f"{exc}: --lr {lr:g} is too high for it (or --warmup-steps {warmup_steps} too few). "
                       f"{kept(run_dir, checkpoint())}") from None  # fmt: skip
    except WriteError as exc:  # a full disk: what was written is whole, the rest unchanged
        raise WriteError(f"{exc}. {resumable(run_dir, checkpoint())}") from None
    finally:
        stop.restore()


class StopFlag:
    """SIGINT/SIGTERM/SIGHUP finish the current step, save, and return (main thread only). SIGHUP: the terminal went away
    (``ddpm.terminal_hangup``; measured: ``ddpm train`` on a pty hung up after 12 s was killed, exit -1, no state.pt)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = handle_unless_ignored(STOP_SIGNALS, self._handle)  # nohup's ignored SIGHUP stays ignored

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        if signum == signal.SIGHUP:
            off_the_terminal()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

