"""The GPU check: every CUDA-relevant test and GPU benchmark in bounded runs, one report per run.

    bash benchmarks/gpu/run.sh OUT_DIR              # on the GPU machine (installs the carried wheels first): the first call
    bash benchmarks/gpu/run.sh OUT_DIR --only kernel,sampler,graphs,drift   # what was measured before, if time is left
    bash benchmarks/gpu/run.sh OUT_DIR --dry-run    # here: the same phases on CPU with tiny sizes

Phases, each a subprocess under its own time limit (a phase that fails or times out is reported and
the next one runs, so a short GPU lease always ends with a report). A session is lent 15 minutes of
device time, start-up included, and a command runs 10 at most, so the default run is what no GPU run has
measured yet, the tests first (GPU-only bugs; the first GPU run found four), in limits that sum to 480 s:
  env      versions, device, TF32 settings, carried wheels
  tests    tests/test_reverse_step.py, tests/test_image_editing.py (Triton kernel vs twin on CUDA tensors) and
           tests/test_device.py (engine, compiled path, server and the CPU-vs-GPU reproducibility
           contract on the device)
  scheduling  benchmarks/scheduling.py at 1.5x capacity (issue 37): interactive requests with deadlines
           beside bulk ones, with priorities and as before them, on the compiled GPU server (its calibration
           also measures the GPU server's capacity and a request's latency alone, which no GPU run has)
Measured on the H200 on 2026-11-30 (BENCHMARKS "GPU"; ~150 s together), run with ``--only``:
  kernel   benchmarks/bench_reverse_step.py --gpu: the fused step's bandwidth against a copy
  sampler  benchmarks/gpu_suite.py: sampler vs diffusers at batch 1/16/64/256 (eager, compiled, bf16, fp16)
  graphs   CUDA-graph gain per batch bucket (torch.compile reduce-overhead vs default)
  drift    bf16/fp16 drift over the whole 1000-step chain
and, in a device call of its own (``run.sh OUT --only server``, ~8 minutes: a session of its own):
  server   benchmarks/gpu/server_bench.py: `ddpm serve` on the device under 1/16/64 closed-loop clients
           (the shipped model and the cifar10-32 shape; the default chain and DDIM 50), beside the
           offline compiled sampler at the same batch and a FastAPI + diffusers server on the same GPU
Writes OUT/gpu_report.md (the tables, verbatim), OUT/gpu_results.json (the same, parsed) and
OUT/gpu_logs.txt (every phase's full output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Phase:
    name: str
    command: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    status: str = "not run"  # ok, failed, timeout
    returncode: int | None = None
    seconds: float = 0.0
    summary: str = ""
    tables: list[dict[str, object]] = field(default_factory=list)
    output: str = ""


def phases(dry_run: bool, device: str, tiny_model: Path | None) -> list[Phase]:
    """The phases and their time limits. On the GPU the default run's sum to 480 s (``DEFAULT_PHASES``), so that the
    whole command (wheels, start-up) stays under the device tool's 10 minutes per command, and a session's 15
    minutes hold the machine's start too."""
    py = sys.executable
    interpret = {"TRITON_INTERPRET": "1" if dry_run else "0"}
    files = ["tests/test_reverse_step.py", "tests/test_image_editing.py", "tests/test_device.py", "tests/test_engine_host_reads.py"]
    if dry_run:  # the suite runs these files on CPU anyway: the rehearsal needs the machinery (one kernel test, the
        # engine's host reads, the cross-device table), not every test again (85 tests, 26 s alone: 2026-12-05)
        files = ["tests/test_reverse_step.py::test_kernel_on_odd_large_shape", "tests/test_engine_host_reads.py",
                 "tests/test_device.py::test_shipped_model_same_images_on_device_and_cpu"]  # fmt: skip
    tests = [py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-rfEs", *files]
    if dry_run:  # the ahead-of-time sm_90 build of the kernel: the suite runs it, the GPU runs the real thing
        tests += ["-k", "not compiles_for_the_h200"]
    kernel = [py, "benchmarks/bench_reverse_step.py", "--gpu"] + (["--dry-run", "--rounds", "2"] if dry_run else [])
    suite = [py, "benchmarks/gpu_suite.py"]
    if dry_run:  # the same code on CPU: a tiny U-Net, 2-step chains, batch 2
        suite += [
            "--device",
            "cpu",
            "--model",
            str(tiny_model),
            "--steps",
            "2",
            "--batches",
            "2",
            "--drift-batch",
            "2",
            "--drift-steps",
            "3",
            "--compile-backend",
            "aot_eager",  # dynamo and AOTAutograd as on the GPU; no inductor C++ for a CPU the GPU run never uses
        ]
    # the dry run's tables at batch 2 only (each batch size is more traces: the graphs 31 s for 1,2 alone, 14 s for 2; the
    # sampler 33 s, 24 s); the recompile at a second batch size that the GPU's 1,16,64,256 make is the suite's own test
    # (tests/test_inference_compile.py::test_compiled_unet_matches_eager_over_changing_batch_sizes, inductor on CPU)
    parts: dict[str, list[str]] = {"sampler": [], "graphs": ["--batches", "2"] if dry_run else [], "drift": []}
    limits = {"tests": 180, "kernel": 60, "sampler": 170, "graphs": 80, "drift": 50, "server": 540, "scheduling": 300}
    # the rehearsal runs inside the suite, beside other workers' compiles on the same cores: its sampler phase
    # once took over 340 s there (35 s alone, warm); the limits bound a GPU run, not the rehearsal
    slack = 4 if dry_run else 1
    server = [py, "benchmarks/gpu/server_bench.py", "--device", device] + (["--dry-run"] if dry_run else [])
    return [
        Phase("tests", tests, limits["tests"] * slack, {"DDPM_TEST_DEVICE": device, **interpret}),
        Phase("kernel", kernel, limits["kernel"], interpret),
        *(Phase(part, [*suite, "--parts", part, *extra], limits[part] * slack) for part, extra in parts.items()),
        Phase("server", server, limits["server"]),
        Phase("scheduling", scheduling_command(py, dry_run, device, tiny_model), limits["scheduling"] * slack),
    ]


def scheduling_command(py: str, dry_run: bool, device: str, tiny_model: Path | None) -> list[str]:
    """Issue 37's 1.5x cell, both modes, priorities first: 20 s each on the GPU (two compiled starts, the second from
    the first's inductor cache; 5 s of warm-in and 10 s of calibration each: on a GPU the call size stays the full
    batch, so there is nothing to learn first, and 10 s at ~50,000 row-calls/s is ~500,000 row-calls); the rehearsal:
    the tiny model, compile off, 1-2 s of each part. On the GPU the interactive requests make 1% of the capacity, not
    the CPU cells' 10%: at the H200's ~50,000 row-calls/s (64 rows in ~1.2 ms), 10% would be ~500 ten-call requests
    a second, which measures the HTTP stack and this one-process client, not the scheduler. A 5 s lead-in before each
    window (the trace's first ~460 bulk requests at that rate) builds the backlog an overload has, so the window does
    not measure an empty server filling up."""
    command = [py, "benchmarks/scheduling.py", "--device", device, "--loads", "1.5", "--modes", "priorities,before"]
    if dry_run:
        return [*command, "--model", str(tiny_model), "--compile", "off", "--seconds", "2", "--lead-in-s", "1", "--calibrate-s", "1",
                "--warm-s", "1"]  # fmt: skip
    return [*command, "--compile", "auto", "--seconds", "20", "--lead-in-s", "5", "--calibrate-s", "10", "--warm-s", "5",
            "--interactive-share", "0.01"]  # fmt: skip


DEFAULT_PHASES = "tests,scheduling"  # never measured on a GPU; the rest with --only (the server: a session of its own)


def environment(wheels: Path | None) -> dict[str, object]:
    import torch

    info: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"missing ({exc})"
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": torch.cuda.get_device_name(0),
            "device_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        }
    if wheels is not None and (wheels / "MANIFEST.txt").exists():
        info["carried_wheels"] = (wheels / "MANIFEST.txt").read_text(encoding="utf-8").split()
    return info


_TABLE_ROW = re.compile(r"^\|.*\|\s*$")
_CROSS_DEVICE = re.compile(r"cross-device (\S+) vs cpu, (.*?): max ([0-9.e+-]+) mean ([0-9.e+-]+)")


def markdown_tables(text: str) -> list[dict[str, object]]:
    """Every Markdown table in ``text`` with the heading above it: {"title", "columns", "rows"}."""
    tables: list[dict[str, object]] = []
    title, lines = "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        if _TABLE_ROW.match(line) and i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= {"-", ":", " "}:
            columns = [c.strip() for c in line.strip().strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and _TABLE_ROW.match(lines[i]):
                rows.append(dict(zip(columns, [c.strip() for c in lines[i].strip().strip("|").split("|")], strict=False)))
                i += 1
            tables.append({"title": title, "columns": columns, "rows": rows})
            continue
        i += 1
    return tables


def pytest_summary(text: str) -> str:
    for line in reversed(text.splitlines()):
        if re.search(r"\d+ (passed|failed|error)", line):
            return line.strip("= ").strip()
    return ""


def run_phase(phase: Phase) -> None:
    env = {**os.environ, **phase.env}
    start = time.monotonic()
    try:
        done = subprocess.run(phase.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=phase.timeout_s)
        phase.returncode = done.returncode
        phase.output = done.stdout + done.stderr
        phase.status = "ok" if done.returncode == 0 else "failed"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        err = exc.stderr or b""
        phase.output = (out.decode() if isinstance(out, bytes) else out) + (err.decode() if isinstance(err, bytes) else err)
        phase.status = "timeout"
    phase.seconds = round(time.monotonic() - start, 1)
    phase.summary = pytest_summary(phase.output) if phase.name == "tests" else ""
    phase.tables = markdown_tables(phase.output)
    for m in _CROSS_DEVICE.finditer(phase.output):  # the reproducibility contract across devices, measured
        phase.tables.append({"title": f"cross-device {m.group(1)} vs cpu, {m.group(2)}", "max_abs": float(m.group(3)),
                             "mean_abs": float(m.group(4))})  # fmt: skip


def report(env: dict[str, object], done: list[Phase], dry_run: bool) -> str:
    title = "GPU check (dry run on CPU)" if dry_run else f"GPU check: {env.get('device', 'no CUDA device')}"
    out = [f"# {title}", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v if not isinstance(v, list) else len(v)} |" for k, v in env.items()]
    out += ["", "| phase | status | seconds | summary |", "|---|---|---|---|"]
    out += [f"| {p.name} | {p.status} | {p.seconds} | {p.summary} |" for p in done]
    for p in done:
        out += ["", f"## {p.name}: {p.status} ({p.seconds} s)", "", "`" + " ".join(p.command[1:]) + "`", ""]
        out += [m.group(0) for m in _CROSS_DEVICE.finditer(p.output)]
        kept = [line for line in p.output.splitlines() if _TABLE_ROW.match(line) or line.startswith("#")]
        out += ["##" + line if line.startswith("#") else line for line in kept]  # the phase's own headings, two levels down
        if p.status != "ok":
            out += ["", "```", *p.output.splitlines()[-40:], "```"]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: rehearse every phase without a GPU")
    parser.add_argument("--wheels", type=Path, default=None, help="the carried wheels folder (for the report)")
    parser.add_argument("--only", default=DEFAULT_PHASES,
                        help=f"comma-separated phases (default: {DEFAULT_PHASES}; also kernel, sampler, graphs, drift, server)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.wheels)
    if not args.dry_run and not env["cuda_available"]:
        print("no CUDA device: use --dry-run on a machine without one", file=sys.stderr)
        return 2
    if not args.dry_run:
        return run_phases(args, env, None)
    with tempfile.TemporaryDirectory(prefix="ddpm-gpu-dry-") as scratch:  # the dry run's tiny model, removed after
        from tests.tiny_model import save_tiny_model

        return run_phases(args, env, save_tiny_model(Path(scratch) / "tiny", num_timesteps=100))


def run_phases(args: argparse.Namespace, env: dict[str, object], tiny_model: Path | None) -> int:
    todo = phases(args.dry_run, "cpu" if args.dry_run else "cuda", tiny_model)
    todo = [p for p in todo if p.name in args.only.split(",")]
    for phase in todo:
        print(f"[gpu-check] {phase.name}: {' '.join(phase.command[1:])} (limit {phase.timeout_s:.0f} s)", flush=True)
        run_phase(phase)
        print(f"[gpu-check] {phase.name}: {phase.status} in {phase.seconds} s {phase.summary}", flush=True)
        # written after every phase: a lease that ends mid-run still leaves the phases done so far
        (args.out / "gpu_report.md").write_text(report(env, todo, args.dry_run), encoding="utf-8")
        results = {"dry_run": args.dry_run, "env": env, "phases": [{k: v for k, v in asdict(p).items() if k != "output"} for p in todo]}
        (args.out / "gpu_results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        with (args.out / "gpu_logs.txt").open("a", encoding="utf-8") as logs:
            logs.write(f"\n===== {phase.name} ({phase.status}, {phase.seconds} s): {' '.join(phase.command)}\n{phase.output}")
    return 0 if all(p.status == "ok" for p in todo) else 1


if __name__ == "__main__":
    sys.exit(main())
