"""Rent: does a CUDA worker's segment agree with a CPU re-run within the verification tolerance?

    python -m benchmarks.rent_device            # on a machine with CUDA; prints a table, writes JSON

Runs the same segment (the built-in ``lm`` recipe, H inner steps from one state on one
shard) on the CPU (all threads, one thread, bf16 codec) and on CUDA (TF32 off and on)
and prints the relative L2 distance of the pseudo-gradients, beside the default
tolerance (RentOptions.tolerance) and the distances
of the cheats. Loads only torch and the rent modules it needs, so it runs where the
network stack is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "p2pcompute"


def _load(name: str) -> types.ModuleType:
    for pkg, path in (("p2pcompute", ROOT), ("p2pcompute.rent", ROOT / "rent")):
        if pkg not in sys.modules:
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(path)]
            sys.modules[pkg] = mod
    file = ROOT / (name.split(".", 1)[1].replace(".", "/") + ".py")
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import torch

    _load("p2pcompute.errors")
    recipes = _load("p2pcompute.rent.recipes")
    segment = _load("p2pcompute.rent.segment")
    lm = recipes.builtin_recipes()["lm"]
    rows = []
    configs = {
        "small": ({"layers": 2, "width": 64, "heads": 4, "vocab": 64, "context": 32}, 16),
        "medium": ({"layers": 4, "width": 256, "heads": 8, "vocab": 512, "context": 128}, 16),
    }
    for label, (cfg_in, batch) in configs.items():
        cfg, model = lm.make(cfg_in)
        start = segment.state_of(model)
        steps = 20
        g = torch.Generator().manual_seed(1)
        data = {"tokens": torch.randint(0, cfg["vocab"], (steps * batch, cfg["context"] + 1), generator=g)}
        t = time.perf_counter()
        ref = segment.run_segment(lm, cfg, start, data, steps)
        cpu_s = time.perf_counter() - t
        runs = {}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        runs["cpu_1_thread"] = (segment.run_segment(lm, cfg, start, data, steps), 0.0)
        torch.set_num_threads(threads)
        runs["cpu_bf16_codec"] = (segment.run_segment(lm, cfg, start, data, steps, codec="bf16"), 0.0)
        if torch.cuda.is_available():
            for tf32 in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                torch.backends.cudnn.allow_tf32 = tf32
                segment.run_segment(lm, cfg, start, data, steps, device="cuda")  # warm-up
                torch.cuda.synchronize()
                t = time.perf_counter()
                r = segment.run_segment(lm, cfg, start, data, steps, device="cuda")
                torch.cuda.synchronize()
                runs[f"cuda_tf32={tf32}"] = (r, time.perf_counter() - t)
            r, s = runs["cuda_tf32=False"]
            bf = segment.run_segment(lm, cfg, start, data, steps, device="cuda", codec="bf16")
            runs["cuda_bf16_codec"] = (bf, s)
        half = segment.run_segment(
            lm, cfg, start, {k: v[: steps // 2 * batch] for k, v in data.items()}, steps // 2
        )
        runs["cheat_half_steps_cpu"] = (half, 0.0)
        for name, (r, s) in runs.items():
            rows.append(
                {
                    "model": label,
                    "run": name,
                    "distance_vs_cpu": segment.distance(r.grad, ref.grad),
                    "seconds": round(s, 4),
                    "cpu_seconds": round(cpu_s, 4),
                }
            )
    print(f"{'model':8} {'run':22} {'distance vs cpu':>16} {'s':>8} {'cpu s':>8}")
    for row in rows:
        print(
            f"{row['model']:8} {row['run']:22} {row['distance_vs_cpu']:16.3g} "
            f"{row['seconds']:8.3f} {row['cpu_seconds']:8.3f}"
        )
    out = Path(os.environ.get("OUT", "bench-results")) / "rent_device.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
