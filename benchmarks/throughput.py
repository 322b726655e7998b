"""Training throughput: end to end against the no-data bound, and the data path alone.

For each method, on the Fashion-MNIST demo shapes (ResNet-32, 28 x 28, batch 128 per
branch), in one process:

* end to end: loaders -> device -> step (forward, backward, optimizer, hooks);
* bound: the same steps on batches already in memory (the first batch of each loader,
  reused), i.e. what training would reach with free data;
* data: the loaders alone.

Each with the fast data path (automatic) and with the per-image path (data.fast_path=false).
Writes <out>/throughput.json and <out>/throughput.md.

    python benchmarks/throughput.py --steps 12 --out benchmarks/results/throughput
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch
from provenance import commit, cpu_name

from longtail.build import build_data, build_method, validate
from longtail.config import load_config
from longtail.data import set_loader_epoch, to_device
from longtail.engine.trainer import StepBatches, build_optimizer, seed_everything

METHODS = {
    "ce": "configs/fashion-mnist/ce-r100.yaml",
    "hybrid-sc": "configs/fashion-mnist/hybrid-sc-r100.yaml",
    "bcl": "configs/fashion-mnist/bcl-r100.yaml",
    "dscl": "configs/fashion-mnist/dscl-r100.yaml",
}


def _images(batches: StepBatches) -> int:
    return batches.images_read()


def measure(
    recipe: str, fast: bool, steps: int, warmup: int, rounds: int, device: torch.device
) -> dict:
    sets = ["data.n_max=1500", "train.batch_size=128", f"data.fast_path={str(fast).lower()}"]
    cfg = validate(load_config(recipe, sets))
    seed_everything(0)
    data = build_data(cfg, need_test=False)
    data.device = device
    method = build_method(cfg, data, device)
    stage = method.stages()[0]
    method.on_stage_start(stage)
    optimizer = build_optimizer(method, cfg.optim)
    loaders = method.loaders(data, stage)
    for loader in loaders.values():
        set_loader_epoch(loader, 0)
    method.train()
    method.on_epoch_start(0)

    def step(raw: dict) -> int:
        batches = StepBatches(raw, device, cfg.train.channels_last)
        terms = method(batches, 0)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        method.after_optimizer_step()
        return _images(batches)

    def run(source) -> float:
        images, t0 = 0, 0.0
        for i, batch in enumerate(itertools.islice(source, warmup + steps)):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                images, t0 = 0, time.perf_counter()
            images += step(dict(zip(loaders, batch, strict=True)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return images / (time.perf_counter() - t0)

    first = [to_device(next(iter(loader)), device) for loader in loaders.values()]
    # Alternate the two, a fresh epoch each time, and keep the medians: on a shared machine
    # the speed drifts more within a minute than the difference measured.
    e2e, bounds = [], []
    for r in range(rounds):
        for loader in loaders.values():
            set_loader_epoch(loader, r)
        e2e.append(run(zip(*loaders.values(), strict=False)))
        bounds.append(run(itertools.repeat(first)))
    end_to_end, bound = statistics.median(e2e), statistics.median(bounds)
    t0, count = time.perf_counter(), 0
    for loader in loaders.values():
        set_loader_epoch(loader, 1)
        for x, _, _ in itertools.islice(loader, steps):
            count += sum(v.shape[0] for v in x) if isinstance(x, list) else x.shape[0]
    data_rate = count / (time.perf_counter() - t0)
    path = type(next(iter(loaders.values()))).__name__
    return {"end_to_end": end_to_end, "bound": bound, "ratio": end_to_end / bound,
            "data": data_rate, "loader": path}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="alternating measurements, median")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput"))
    args = p.parse_args()
    device = torch.device(args.device)
    results = {
        "hardware": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "commit": commit(),
        "steps": args.steps,
        "rounds": args.rounds,
        "runs": {},
    }
    for name in args.methods:
        for fast in (True, False):
            key = f"{name}/{'fast' if fast else 'per-image'}"
            results["runs"][key] = measure(
                METHODS[name], fast, args.steps, args.warmup, args.rounds, device
            )
            r = results["runs"][key]
            line = f"{key}: {r['end_to_end']:.0f} img/s end to end, bound {r['bound']:.0f} "
            print(f"{line}({r['ratio']:.2f}), data alone {r['data']:.0f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(results, indent=1))
    hw = results["hardware"]
    lines = [
        f"Fashion-MNIST demo shapes (ResNet-32, 28 x 28, batch 128 per branch), medians of "
        f"{args.rounds} alternating measurements of {args.steps} steps after {args.warmup}; "
        f"{hw['device']} ({hw['cpu']}, {hw['cores']} cores, "
        f"{hw['threads']} threads), torch {hw['torch']}, commit {results['commit']}. Images/s "
        "count every image a step forwards (all views).",
        "",
        "| method | data path | end to end | bound (data in memory) | ratio | data alone |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in results["runs"].items():
        name, path = key.split("/")
        path = f"{path} ({r['loader']})"
        lines.append(f"| {name} | {path} | {r['end_to_end']:.0f} | {r['bound']:.0f} | "
                     f"{r['ratio']:.2f} | {r['data']:.0f} |")  # fmt: skip
    (args.out / "throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
