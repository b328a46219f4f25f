"""Candidate samplers at <= 10 U-Net calls, prototyped outside the server before any was built (issue 26).

    python benchmarks/sampler_prototypes.py                              # every experiment, N = 500
    python benchmarks/sampler_prototypes.py sde2m-trailing-10 sde2m-restart-10 --seed 99

Each experiment is a solver written here from its paper, in float64 (the shipped U-Net in fp32, eager),
over the model's discrete T = 1000 chain, its noise from torch's generator (not the server's Philox
streams: the figures are comparable with each other, not with the quality table's cells). Scored as
``ddpm eval`` scores (FD and confident share on the project's classifier, N images). One JSON line per
experiment to --out. What came out of it (BENCHMARKS.md, "<= 10 U-Net calls"): restart sampling on
SDE-DPM-Solver++(2M) became the ``restart`` sampler; 3M and the noise-level spacings did not.

Solvers (lambda = log(alpha / sigma), h = lambda_t - lambda_s, x0 the clipped data prediction):
- DPM-Solver++(2M) ODE and SDE (Lu et al. 2022), as ``ddpm.samplers.dpm_solver.dpmsolver_table``;
- SDE-DPM-Solver++(3M): k-diffusion's ``sample_dpmpp_3m_sde`` (eta 1) in VP form;
- restart (Xu et al. 2023): before the call at ts[i], jump from ts[i]'s level to t_max's by the forward
  process and take k ODE steps back down to ts[i];
- spacings: trailing, Karras sigmas (rho 7), uniform logSNR, DDIM's quadratic, each rounded to integer t, and
  GITS's timesteps searched for this model (Chen et al. 2024; no gain either: BENCHMARKS.md, stop 73).
- UniPC (Zhao et al. 2023), UniP-p predictor with the UniC corrector, as diffusers' ``UniPCMultistepScheduler``
  (bh2, data prediction): better than DPM-Solver++(2M) in every paired cell at 3-10 calls (BENCHMARKS.md, stop 75); it
  needs p x0 registers a row, where the fused step has one.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm.classifier import load_classifier
from ddpm.evaluate import evaluate
from ddpm.model_source import load_model_source
from ddpm.shipped_models import DEFAULT_CLASSIFIER, DEFAULT_MODEL


class Solvers:
    """The shipped model's chain in float64, and the solvers over it."""

    def __init__(self) -> None:
        self.model = load_model_source(DEFAULT_MODEL, "cpu")
        abar = np.asarray(self.model.schedule.alphas_cumprod, dtype=np.float64)
        self.big_t = len(abar)
        self.abar, self.alpha, self.sigma = abar, np.sqrt(abar), np.sqrt(1 - abar)
        self.lam = np.log(self.alpha / self.sigma)

    def x0(self, x: torch.Tensor, t: int) -> torch.Tensor:
        with torch.inference_mode():
            eps = self.model.eps_model(x.float(), torch.full((x.shape[0],), int(t), dtype=torch.long)).double()
        x0 = (x - self.sigma[t] * eps) / self.alpha[t]  # Ho et al. Eq. 15
        return x0.clamp(-1, 1) if self.model.clip_denoised else x0

    # spacings: model-call timesteps, decreasing
    def trailing(self, n: int) -> np.ndarray:
        return (np.round(np.arange(self.big_t, 0, -self.big_t / n)) - 1).astype(int)

    def _nearest(self, values: np.ndarray, table: np.ndarray) -> np.ndarray:
        return np.array([int(np.argmin(np.abs(table - v))) for v in values])

    def karras(self, n: int, rho: float = 7.0) -> np.ndarray:
        vsig = self.sigma / self.alpha
        r = np.linspace(0, 1, n)
        s = (vsig[-1] ** (1 / rho) + r * (vsig[0] ** (1 / rho) - vsig[-1] ** (1 / rho))) ** rho
        return self._nearest(np.log(s), np.log(vsig))

    def logsnr(self, n: int) -> np.ndarray:
        return self._nearest(np.linspace(self.lam[-1], self.lam[0], n), self.lam)

    def quadratic(self, n: int) -> np.ndarray:
        return np.round((np.linspace(0, np.sqrt(self.big_t - 1), n) ** 2)[::-1]).astype(int)

    @functools.cached_property
    def gits_teacher(self) -> tuple[list[int], dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
        """GITS's teachers: 64 probability-flow ODE trajectories (DPM-Solver++(2M) over all T steps, torch seed 7), their
        states and clean-data predictions at the grid's timesteps (999 and 0, 10, ..., 989), and their clean ends."""
        big_t, lam, alpha, sigma = self.big_t, self.lam, self.alpha, self.sigma
        grid = [int(t) for t in sorted({big_t - 1, *np.round(np.linspace(0, big_t - 1, 101))[:-1].astype(int)}, reverse=True)]
        x = torch.randn((64, *self.model.image_shape), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        xs, x0s, hist, on_grid = {}, {}, None, set(grid)
        for s in range(big_t - 1, -1, -1):
            x0 = self.x0(x, s)
            if s in on_grid:
                xs[s], x0s[s] = x, x0
            if s == 0:
                break
            t, h = s - 1, lam[s - 1] - lam[s]
            out = sigma[t] / sigma[s] * x - alpha[t] * math.expm1(-h) * x0
            if hist is not None:
                out = out - 0.5 * alpha[t] * math.expm1(-h) * (x0 - hist[0]) / ((lam[s] - hist[1]) / h)
            hist, x = (x0, lam[s]), out
        return grid, xs, x0s, x0

    def gits(self, n: int) -> np.ndarray:
        """GITS (Chen et al., ICML 2024, "A Geometric Perspective on Optimal Timesteps"): the n model-call timesteps on
        the teachers' grid whose DDIM jumps stay closest to the teachers (``gits_teacher``): the squared error of each
        jump i -> j against the teacher's state at j (or its clean end), summed over the path, minimised by dynamic
        programming."""
        grid, xs, x0s, end = self.gits_teacher
        alpha, sigma, g = self.alpha, self.sigma, len(grid)

        def cost(i: int, j: int) -> float:  # DDIM from grid[i] to grid[j] (j = g: to clean data)
            s = grid[i]
            if j == g:
                return float(((x0s[s] - end) ** 2).mean())
            eps = (xs[s] - alpha[s] * x0s[s]) / sigma[s]
            return float(((alpha[grid[j]] * x0s[s] + sigma[grid[j]] * eps - xs[grid[j]]) ** 2).mean())

        c = np.array([[cost(i, j) if j > i else np.inf for j in range(g + 1)] for i in range(g)])
        best, back = np.full((n + 1, g + 1), np.inf), np.zeros((n + 1, g + 1), dtype=int)
        best[1, 0] = 0.0  # the first call at t = 999
        for k in range(1, n):
            for j in range(1, g):
                back[k + 1, j] = int(np.argmin(best[k, :j] + c[:j, j]))
                best[k + 1, j] = best[k, back[k + 1, j]] + c[back[k + 1, j], j]
        path = [int(np.argmin(best[n, :g] + c[:g, g]))]
        for k in range(n, 1, -1):
            path.append(int(back[k, path[-1]]))
        return np.array([grid[i] for i in reversed(path)])

    def dpm(self, x: torch.Tensor, ts: np.ndarray, gen: torch.Generator, sde: bool, order: int = 2,
            restarts: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:  # fmt: skip
        """DPM-Solver++(order)M, ODE or SDE, over ``ts`` then to clean data; ``restarts``: (i, t_max, k)."""
        plan: list[tuple[str, int, int | None, bool]] = []
        jumps = {i: (t_max, k) for i, t_max, k in restarts}
        for i, t in enumerate(ts):
            if i in jumps:
                t_max, k = jumps[i]
                plan.append(("jump", int(t), t_max, False))
                sub = np.round(np.linspace(t_max, t, k + 1)).astype(int)
                plan += [("step", int(a), int(b), False) for a, b in itertools.pairwise(sub)]
            plan.append(("step", int(t), int(ts[i + 1]) if i + 1 < len(ts) else None, sde))
        lam, alpha, sigma = self.lam, self.alpha, self.sigma
        hist: list[tuple[torch.Tensor, float]] = []
        for kind, s, t, stochastic in plan:
            if kind == "jump":  # Ho et al. Eq. 4 between two levels
                assert t is not None
                r = self.abar[t] / self.abar[s]
                x = math.sqrt(r) * x + math.sqrt(1 - r) * torch.randn(x.shape, generator=gen, dtype=torch.float64)
                hist = []
                continue
            x0 = self.x0(x, s)
            if t is None:
                return x0
            h = lam[t] - lam[s]
            if not stochastic:
                out = sigma[t] / sigma[s] * x - alpha[t] * math.expm1(-h) * x0
                if order >= 2 and hist:
                    out = out - 0.5 * alpha[t] * math.expm1(-h) * (x0 - hist[0][0]) / ((lam[s] - hist[0][1]) / h)
            else:
                he = 2 * h
                out = sigma[t] / sigma[s] * math.exp(-h) * x + alpha[t] * -math.expm1(-he) * x0
                if order == 2 and hist:
                    out = out + 0.5 * alpha[t] * -math.expm1(-he) * (x0 - hist[0][0]) / ((lam[s] - hist[0][1]) / h)
                elif order == 3 and hist:
                    phi2 = math.expm1(-he) / he + 1
                    r0 = (lam[s] - hist[0][1]) / h
                    d1_0 = (x0 - hist[0][0]) / r0
                    if len(hist) == 1:
                        out = out + alpha[t] * phi2 * d1_0
                    else:
                        r1 = (hist[0][1] - hist[1][1]) / h
                        d1_1 = (hist[0][0] - hist[1][0]) / r1
                        d1, d2 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)
                        out = out + alpha[t] * (phi2 * d1 - (phi2 / he - 0.5) * d2)
                out = out + sigma[t] * math.sqrt(-math.expm1(-he)) * torch.randn(x.shape, generator=gen, dtype=torch.float64)
            hist = [(x0, float(lam[s])), *hist[:1]]
            x = out
        return x

    def unipc(self, x: torch.Tensor, ts: np.ndarray, order: int = 2, corrector: bool = True) -> torch.Tensor:
        """UniPC (Zhao et al., NeurIPS 2023), data prediction, B(h) = e^-h - 1 ("bh2"), as diffusers'
        ``UniPCMultistepScheduler``: UniP-``order`` predicts the next state from the last ``order`` x0's; UniC corrects
        the state a call was made at with that call's own x0 (no extra call), at the order of the step that made it.
        Warm-up and the step to clean data at lower order; the last call's x0 is the image."""
        hist: list[tuple[torch.Tensor, float]] = []  # (x0, lambda) of the calls made, newest first
        last: tuple[torch.Tensor, int, int] | None = None  # the state the previous step started from, its t, its order
        for i, s in enumerate(ts):
            m = self.x0(x, s)
            if corrector and last is not None:
                x = self._uni(last[0], last[1], int(s), hist, last[2], m_t=m)
            if i + 1 == len(ts):
                return m
            hist = [(m, float(self.lam[s])), *hist][:order]
            this_order = min(order, len(hist))
            last = (x, int(s), this_order)
            x = self._uni(x, int(s), int(ts[i + 1]), hist, this_order)
        return x

    def _uni(self, x: torch.Tensor, s0: int, t: int, hist: list[tuple[torch.Tensor, float]], order: int,
             m_t: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """UniP (``m_t`` None) or UniC (``m_t``: the x0 of the call made at t) from s0 to t, over ``hist`` (x0 at s0 first)."""
        lam, alpha, sigma = self.lam, self.alpha, self.sigma
        m0, l0 = hist[0]
        h = lam[t] - l0
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh)
        rks, d1s = [], []
        for k in range(1, order):
            mi, li = hist[k]
            rk = (li - l0) / h
            rks.append(rk)
            d1s.append((mi - m0) / rk)
        rks.append(1.0)
        r_rows, b_vals, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
        for k in range(1, order + 1):
            r_rows.append([r ** (k - 1) for r in rks])
            b_vals.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        out = sigma[t] / sigma[s0] * x - alpha[t] * h_phi_1 * m0
        if m_t is None:  # UniP
            if not d1s:
                return out
            rhos = [0.5] if order == 2 else np.linalg.solve(np.array(r_rows)[:-1, :-1], np.array(b_vals)[:-1])
            return out - alpha[t] * b_h * sum(r * d for r, d in zip(rhos, d1s, strict=True))
        rhos_c = [0.5] if order == 1 else np.linalg.solve(np.array(r_rows), np.array(b_vals))
        corr = sum(r * d for r, d in zip(rhos_c[:-1], d1s, strict=True)) if d1s else 0.0
        return out - alpha[t] * b_h * (corr + rhos_c[-1] * (m_t - m0))

    def ddpm(self, x: torch.Tensor, ts: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        """Algorithm 2 over the respaced chain (the posterior of Eq. 7 with respaced betas)."""
        for i, s in enumerate(ts):
            x0 = self.x0(x, s)
            if i + 1 == len(ts):
                return x0
            ab_s, ab_t = self.abar[s], self.abar[ts[i + 1]]
            beta = 1 - ab_s / ab_t
            mean = math.sqrt(ab_t) * beta / (1 - ab_s) * x0 + math.sqrt(1 - beta) * (1 - ab_t) / (1 - ab_s) * x
            x = mean + math.sqrt(beta * (1 - ab_t) / (1 - ab_s)) * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        return x


Experiment = Callable[[Solvers, torch.Tensor, torch.Generator], torch.Tensor]


def experiments() -> dict[str, tuple[int, Experiment]]:
    """name: (U-Net calls, the chain)."""
    return {
        "sde2m-trailing-10": (10, lambda m, x, g: m.dpm(x, m.trailing(10), g, sde=True)),
        "sde2m-trailing-8": (8, lambda m, x, g: m.dpm(x, m.trailing(8), g, sde=True)),
        "sde2m-karras-10": (10, lambda m, x, g: m.dpm(x, m.karras(10), g, sde=True)),
        "sde2m-logsnr-10": (10, lambda m, x, g: m.dpm(x, m.logsnr(10), g, sde=True)),
        "sde2m-quadratic-10": (10, lambda m, x, g: m.dpm(x, m.quadratic(10), g, sde=True)),
        "sde3m-trailing-10": (10, lambda m, x, g: m.dpm(x, m.trailing(10), g, sde=True, order=3)),
        "sde3m-trailing-8": (8, lambda m, x, g: m.dpm(x, m.trailing(8), g, sde=True, order=3)),
        "sde3m-karras-10": (10, lambda m, x, g: m.dpm(x, m.karras(10), g, sde=True, order=3)),
        "sde3m-quadratic-10": (10, lambda m, x, g: m.dpm(x, m.quadratic(10), g, sde=True, order=3)),
        "ode2m-trailing-10": (10, lambda m, x, g: m.dpm(x, m.trailing(10), g, sde=False)),
        "ddpm-trailing-10": (10, lambda m, x, g: m.ddpm(x, m.trailing(10), g)),
        # restart: 8 main calls (t = 999 .. 124), before the call at t = 124 a jump and 2 ODE calls back down
        "sde2m-restart-10": (10, lambda m, x, g: m.dpm(x, m.trailing(8), g, sde=True, restarts=((7, 374, 2),))),
        "sde3m-restart-10": (10, lambda m, x, g: m.dpm(x, m.trailing(8), g, sde=True, order=3, restarts=((7, 374, 2),))),
        "ode2m-restart-10": (10, lambda m, x, g: m.dpm(x, m.trailing(8), g, sde=False, restarts=((7, 374, 2),))),
        "ode2m-restart-higher-10": (10, lambda m, x, g: m.dpm(x, m.trailing(8), g, sde=False, restarts=((6, 499, 2),))),
        "sde2m-restart-3-inner-10": (10, lambda m, x, g: m.dpm(x, m.trailing(7), g, sde=True, restarts=((6, 428, 3),))),
        "ode2m-two-restarts-10": (10, lambda m, x, g: m.dpm(x, m.trailing(6), g, sde=False, restarts=((4, 665, 2), (5, 332, 2)))),
        # below 10 calls (2026-12-07, stop 73): timesteps searched for this model (GITS), and restart at 8 calls
        "ode2m-trailing-4": (4, lambda m, x, g: m.dpm(x, m.trailing(4), g, sde=False)),
        "ode2m-gits-4": (4, lambda m, x, g: m.dpm(x, m.gits(4), g, sde=False)),
        "ode2m-trailing-6": (6, lambda m, x, g: m.dpm(x, m.trailing(6), g, sde=False)),
        "ode2m-gits-6": (6, lambda m, x, g: m.dpm(x, m.gits(6), g, sde=False)),
        "sde2m-trailing-6": (6, lambda m, x, g: m.dpm(x, m.trailing(6), g, sde=True)),
        "sde2m-gits-6": (6, lambda m, x, g: m.dpm(x, m.gits(6), g, sde=True)),
        "ode2m-trailing-8": (8, lambda m, x, g: m.dpm(x, m.trailing(8), g, sde=False)),
        "ode2m-gits-8": (8, lambda m, x, g: m.dpm(x, m.gits(8), g, sde=False)),
        "sde2m-restart-8": (8, lambda m, x, g: m.dpm(x, m.trailing(6), g, sde=True, restarts=((5, 499, 2),))),  # the sampler's plan
        "sde2m-restart-lower-8": (8, lambda m, x, g: m.dpm(x, m.trailing(6), g, sde=True, restarts=((5, 332, 2),))),
        "sde2m-restart-k1-8": (8, lambda m, x, g: m.dpm(x, m.trailing(7), g, sde=True, restarts=((6, 285, 1),))),
        # UniPC (stop 75): the predictor-corrector the issue named, at 4-8 calls
        **{f"unipc2-trailing-{n}": (n, functools.partial(lambda n, m, x, g: m.unipc(x, m.trailing(n)), n)) for n in (4, 5, 6, 8, 10)},
        **{f"unipc3-trailing-{n}": (n, functools.partial(lambda n, m, x, g: m.unipc(x, m.trailing(n), order=3), n))
           for n in (3, 4, 5, 6, 8, 10)},
        **{f"unipc1-trailing-{n}": (n, functools.partial(lambda n, m, x, g: m.unipc(x, m.trailing(n), order=1), n))
           for n in (4, 5, 6, 8, 10)},
        **{f"unip2-trailing-{n}": (n, functools.partial(lambda n, m, x, g: m.unipc(x, m.trailing(n), corrector=False), n)) for n in (4, 6)},
        "ode2m-trailing-5": (5, lambda m, x, g: m.dpm(x, m.trailing(5), g, sde=False)),
        "ode2m-trailing-3": (3, lambda m, x, g: m.dpm(x, m.trailing(3), g, sde=False)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="experiments to run (default: all)")
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234, help="torch generator seed: x_T and every noise draw")
    parser.add_argument("--out", default="benchmarks/results/sampler_prototypes.jsonl")
    args = parser.parse_args()
    solvers, classifier, table = Solvers(), load_classifier(DEFAULT_CLASSIFIER), experiments()
    for name in args.names or list(table):
        calls, chain = table[name]
        gen, start, parts = torch.Generator().manual_seed(args.seed), time.perf_counter(), []
        for first in range(0, args.n, 250):
            x = torch.randn((min(250, args.n - first), *solvers.model.image_shape), generator=gen, dtype=torch.float64)
            parts.append(chain(solvers, x, gen).float().clamp(-1, 1))
        report = evaluate(classifier, torch.cat(parts), seed=0)
        row = {"name": name, "calls": calls, "n": args.n, "seed": args.seed, "fd": round(report["samples"]["fd"], 2),
               "confident_share": report["samples"]["confident_share"], "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        if "-gits-" in name:  # the searched timesteps (the teachers run once a run, in the first gits experiment: ~3 min)
            row["timesteps"] = solvers.gits(calls).tolist()
        print(json.dumps(row), flush=True)
        with Path(args.out).open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
