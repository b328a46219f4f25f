"""How much work on the other core slows the U-Net on this one: the CPU scheduling cells' iterations ran 8-18%
slower than the U-Net measured alone (BENCHMARKS "With a lead-in"), with the server's HTTP side, each answer's PNG
encoding and the load client on the second core of a 2-core machine.

    python benchmarks/neighbour_load.py                        # 6 rows (a deadline-bound call on this CPU), eager
    python benchmarks/neighbour_load.py --rows 6,64 --seconds 5 --rounds 3 --compile auto

The shipped U-Net in a process pinned to core 0 (1 torch thread, as ``benchmarks/scheduling.py`` serves it), timed
for ``--seconds`` while core 1 runs, in turn: nothing; a Python spin loop (an event loop's kind of work: no memory
traffic); PNG encoding of the shipped model's images (Pillow: what each answer costs the server); a stream through
a 256 MiB array (memory bandwidth: the L3 cache and the memory controller are shared); and the same U-Net at the
same rows (the other core doing what this one does); then a thread of the U-Net's own process on core 1, spinning
in Python or encoding PNGs (the server's event loop and request threads share the engine's process, and its GIL).
ms per call, the median call of each window, per round; the kinds take turns in each round (these machines drift:
compare within a run only). Linux only (``taskset``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEIGHBOURS = ("none", "spin", "png", "memory", "unet", "thread-spin", "thread-png")

UNET = """
import io, os, sys, threading, time, json, numpy as np, torch
from PIL import Image
os.sched_setaffinity(0, {{{core}}})  # this thread (the U-Net's) on its core; a neighbour thread of this process on core 1
sys.setswitchinterval({switch_s})  # how long a thread that wants the GIL waits before it asks its holder to let go
sys.path.insert(0, {root!r})
from ddpm.inference_compile import hot_path
from ddpm.model_source import load_model_source
torch.set_num_threads(1)
model = load_model_source({model!r}, torch.device("cpu"))
eps = hot_path(model.eps_model, model.module, torch.device("cpu"), {compile!r}, precision="fp32").eps_model
x = torch.randn({rows}, *model.image_shape)
t = torch.full(({rows},), 500, dtype=torch.long)
image = Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8))

def load(kind, stop):  # a thread of this process: it takes the GIL whenever the U-Net's thread lets go of it
    os.sched_setaffinity(0, {{1}})
    while not stop.is_set():
        if kind == "thread-png":
            image.save(io.BytesIO(), format="PNG")
        else:
            sum(range(1000))

with torch.inference_mode():
    for _ in range(3):
        eps(x, t)
    print("ready", flush=True)
    for line in sys.stdin:  # one window per line: its length in seconds, and a neighbour thread's kind or "-"
        seconds, kind = line.split()
        stop = threading.Event()
        neighbour = threading.Thread(target=load, args=(kind, stop), daemon=True) if kind != "-" else None
        if neighbour is not None:
            neighbour.start()
        calls, end = [], time.perf_counter() + float(seconds)
        while time.perf_counter() < end:
            start = time.perf_counter()
            eps(x, t)
            calls.append(time.perf_counter() - start)
        stop.set()
        if neighbour is not None:
            neighbour.join()
        print(json.dumps(sorted(calls)[len(calls) // 2] * 1e3), flush=True)
"""

LOADS = {
    "spin": "while True:\n    pass",
    "png": """
import io, numpy as np
from PIL import Image
image = Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8))
while True:
    image.save(io.BytesIO(), format="PNG")
""",
    "memory": """
import numpy as np
a, b = np.ones(2**25), np.empty(2**25)  # 256 MiB each: far past the L3 cache
while True:
    np.copyto(b, a)
""",
}
THREADS = ("thread-spin", "thread-png")  # in the U-Net's own process


def pinned(cores: int | str, code: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(["taskset", "-c", str(cores), sys.executable, "-c", code], env=env, text=True, **kwargs)  # type: ignore[call-overload]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="6")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", default="off", choices=["off", "auto"])
    p.add_argument("--model", default=str(ROOT / "models" / "mnist-28"))
    p.add_argument("--switch-ms", type=float, default=5.0, help="sys.setswitchinterval in the U-Net's process (Python's default: 5 ms)")
    args = p.parse_args()
    info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    isa = "avx512" if "avx512f" in info else "avx2"
    print(f"CPU: {cpu} [{isa}], {os.cpu_count()} cores; U-Net on core 0, the neighbour on core 1; compile {args.compile}, "
          f"GIL switch interval {args.switch_ms:g} ms")
    results: dict[int, dict[str, list[float]]] = {}
    for rows in (int(r) for r in args.rows.split(",")):
        fill = {"root": str(ROOT), "model": args.model, "compile": args.compile, "rows": rows, "core": 0, "switch_s": args.switch_ms / 1e3}
        unet = pinned("0,1", UNET.format(**fill), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert unet.stdout is not None and unet.stdin is not None and unet.stdout.readline().strip() == "ready"
        ms: dict[str, list[float]] = {kind: [] for kind in NEIGHBOURS}
        try:
            for _ in range(args.rounds):
                for kind in NEIGHBOURS:
                    neighbour = None
                    if kind == "unet":
                        neighbour = pinned(1, UNET.format(**{**fill, "core": 1}), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                        assert neighbour.stdout is not None and neighbour.stdin is not None
                        assert neighbour.stdout.readline().strip() == "ready"
                        neighbour.stdin.write("1e9 -\n")  # one window that outlasts this one
                        neighbour.stdin.flush()
                    elif kind in LOADS:
                        neighbour = pinned(1, LOADS[kind])
                        time.sleep(1.0)  # its start-up (imports, the arrays) is over
                    try:
                        unet.stdin.write(f"{args.seconds} {kind if kind in THREADS else '-'}\n")
                        unet.stdin.flush()
                        ms[kind].append(float(unet.stdout.readline()))
                    finally:
                        if neighbour is not None:
                            neighbour.kill()
                            neighbour.wait()
        finally:
            unet.kill()
        results[rows] = ms
        alone = statistics.median(ms["none"])
        print(f"\n{rows} rows: ms per U-Net call (median call of each {args.seconds:g} s window; rounds), and the median over alone\n")
        print("| core 1 runs | ms per call | over alone |\n|---|---|---|")
        for kind in NEIGHBOURS:
            print(f"| {kind} | {', '.join(f'{v:.1f}' for v in ms[kind])} | {statistics.median(ms[kind]) / alone:.3f} |")
    print(json.dumps({"cpu": cpu, "isa": isa, "compile": args.compile, "ms": {str(k): v for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
