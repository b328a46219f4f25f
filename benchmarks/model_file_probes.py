"""Hostile round ten, reproducible: a model directory edited by hand or damaged, one field at a time.

    python benchmarks/model_file_probes.py                    # every variant, `ddpm info` on each
    python benchmarks/model_file_probes.py --command sample   # `ddpm sample -n 1 --steps 2` instead
    python benchmarks/model_file_probes.py nan_weights        # some variants, by name

Each variant is the shipped model's directory copied with one change to its ``config.json`` or its weights; each runs
in a fresh process capped at 8 GiB of address space (a variant that asked torch or numpy for more than that was a
process killed for memory before round ten, not a line saying why). Printed per variant: the exit code, whether the
output held a traceback, the last line, and seconds. Every variant but the accepted ones (fp16, fp64 weights) should
end with exit 1, no traceback and a line naming the field (RELIABILITY.md, round ten).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm.shipped_models import DEFAULT_MODEL

ADDRESS_SPACE = 8 << 30


def _set(*path: str, value: Any) -> Callable[[dict], Any]:
    def edit(cfg: dict) -> dict:
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return cfg

    return edit


CONFIG_EDITS: dict[str, Callable[[dict], Any]] = {
    "base_channels_4e6": _set("unet", "base_channels", value=4_000_000),
    "timesteps_0": _set("schedule", "num_timesteps", value=0),
    "timesteps_1": _set("schedule", "num_timesteps", value=1),
    "timesteps_1e9": _set("schedule", "num_timesteps", value=10**9),
    "beta_end_2": _set("schedule", "params", "beta_end", value=2.0),
    "beta_start_negative": _set("schedule", "params", "beta_start", value=-0.1),
    "beta_start_nan": _set("schedule", "params", "beta_start", value=float("nan")),
    "schedule_quadratic": _set("schedule", "kind", value="quadratic"),
    "image_shape_3_channels": _set("image_shape", value=[3, 28, 28]),
    "image_shape_negative": _set("image_shape", value=[1, -28, 28]),
    "num_groups_7": _set("unet", "num_groups", value=7),
    "num_groups_0": _set("unet", "num_groups", value=0),
    "channel_mult_empty": _set("unet", "channel_mult", value=[]),
    "num_res_blocks_0": _set("unet", "num_res_blocks", value=0),
    "dropout_2": _set("unet", "dropout", value=2.0),
    "variance_learned": _set("variance_type", value="learned"),
    "unet_unknown_key": _set("unet", "bogus", value=1),
    "image_size_string": _set("unet", "image_size", value="28"),
    "in_channels_0": _set("unet", "in_channels", value=0),
    "clip_denoised_yes": _set("clip_denoised", value="yes"),
    "unet_a_list": _set("unet", value=[1, 2]),
    "config_a_list": lambda cfg: [cfg],
}
WEIGHT_EDITS = ("nan_weights", "int8_weights", "fp16_weights", "fp64_weights")


def _damage_weights(name: str, directory: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(directory / "model.safetensors")
    if name == "nan_weights":
        first = next(iter(state))
        state[first] = state[first] * float("nan")
    else:
        dtype = {"int8_weights": torch.int8, "fp16_weights": torch.float16, "fp64_weights": torch.float64}[name]
        state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, directory / "model.safetensors")


def variant(name: str, root: Path) -> Path:
    directory = root / name
    shutil.copytree(DEFAULT_MODEL, directory)
    if name in WEIGHT_EDITS:
        _damage_weights(name, directory)
    else:
        config = CONFIG_EDITS[name](json.loads((directory / "config.json").read_text(encoding="utf-8")))
        (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def probe(directory: Path, command: str) -> dict[str, Any]:
    argv = ["info"] if command == "info" else ["sample", "-n", "1", "--steps", "2", "--quiet", "-o", str(directory / "x.png")]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "commands.main", *argv, "--model", str(directory)], capture_output=True, text=True,
                          timeout=600, preexec_fn=_capped, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    lines = done.stderr.strip().splitlines() or [""]
    return {"code": done.returncode, "traceback": "Traceback" in done.stderr, "said": lines[-1][:200],
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"variants (default: all): {', '.join([*CONFIG_EDITS, *WEIGHT_EDITS])}")
    parser.add_argument("--command", choices=("info", "sample"), default="info")
    args = parser.parse_args()
    names = args.names or [*CONFIG_EDITS, *WEIGHT_EDITS]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(json.dumps({"variant": name, **probe(variant(name, Path(tmp)), args.command)}), flush=True)


if __name__ == "__main__":
    main()
