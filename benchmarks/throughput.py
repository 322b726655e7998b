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

With ``--jpeg-folder DIR`` it measures instead the practitioner's case: a folder of
camera-size JPEGs (written there first: 500 x 375, long-tailed over 10 classes), the
configs/folder ResNet-50 recipe at 224 px (random init: the speed is the same), the
per-image path (PIL decode + random-resized crop + RandAugment + normalise in the loader
workers) with 0 and ``--workers`` processes, and the device path (the workers read the files;
decode, crop and RandAugment on the device: data.decode=device), each against the no-data
bound; and the steps of each path alone.

    python benchmarks/throughput.py --jpeg-folder /tmp/jpegs --steps 4 --rounds 3 \
        --out benchmarks/results/throughput-jpeg
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
    recipe: str, sets: list[str], steps: int, warmup: int, rounds: int, device: torch.device
) -> dict:
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
    if device.type == "cuda":  # the device path's batches are made asynchronously
        torch.cuda.synchronize()
    data_rate = count / (time.perf_counter() - t0)
    path = type(next(iter(loaders.values()))).__name__
    return {"end_to_end": end_to_end, "bound": bound, "ratio": end_to_end / bound,
            "data": data_rate, "loader": path}  # fmt: skip


def say(key: str, r: dict, digits: int) -> None:
    """One measurement's line: images/s end to end, its bound, their ratio, data alone."""
    print(f"{key}: {r['end_to_end']:.{digits}f} img/s end to end, bound {r['bound']:.{digits}f} "
          f"({r['ratio']:.2f}), data alone {r['data']:.{digits}f}", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="alternating measurements, median")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput"))
    p.add_argument("--jpeg-folder", type=Path, help="measure a 224-px JPEG folder instead")
    p.add_argument("--images", type=int, default=600, help="JPEGs to write (--jpeg-folder)")
    p.add_argument("--batch-size", type=int, default=16, help="(--jpeg-folder)")
    p.add_argument("--workers", type=int, default=2, help="loader processes (--jpeg-folder)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.jpeg_folder is not None:
        jpeg_folder(args, device)
        return
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
            sets = ["data.n_max=1500", "train.batch_size=128", f"data.fast_path={fast}".lower()]
            results["runs"][key] = measure(
                METHODS[name], sets, args.steps, args.warmup, args.rounds, device
            )
            say(key, results["runs"][key], 0)
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


def write_jpegs(root: Path, total: int, seed: int = 0) -> None:
    """``root/train/<class>/<i>.jpg`` (and a small test split): 500 x 375 RGB JPEGs at
    quality 90, smooth colour fields with noise (about what a camera photo costs to decode),
    counts long-tailed over 10 classes at ratio 10."""
    import numpy as np
    from PIL import Image

    if (root / "train").is_dir():
        return
    rng = np.random.default_rng(seed)
    counts = [max(1, round(total * 0.1 ** (c / 9) / 4.3)) for c in range(10)]
    yy, xx = np.mgrid[0:375, 0:500] / 500.0
    for split, per_class in (("train", counts), ("test", [4] * 10)):
        for c, n in enumerate(per_class):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a, b, ph = rng.uniform(2, 12, 3)
                field = [np.sin(a * xx + ph * k) * np.cos(b * yy - k) for k in range(3)]
                img = np.stack(field, -1) * 90 + 128 + rng.normal(0, 18, (375, 500, 3))
                Image.fromarray(img.clip(0, 255).astype("uint8")).save(
                    folder / f"{i}.jpg", quality=90
                )


def data_steps(root: Path, n: int) -> dict[str, float]:
    """Images/s of each step of the per-image path, on one core: JPEG decode, then the
    training transform's parts at 224 px."""
    from PIL import Image
    from torchvision.transforms import v2

    from longtail.data import build_transform
    from longtail.data.sources import IMAGENET_MEAN, IMAGENET_STD

    files = sorted((root / "train").rglob("*.jpg"))[:n]
    crop = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()])
    randaug = v2.RandAugment(num_ops=2, magnitude=9)
    strong = build_transform("strong", 224, 3, IMAGENET_MEAN, IMAGENET_STD)
    rates = {}
    t0 = time.perf_counter()
    decoded = [Image.open(f).convert("RGB") for f in files]
    rates["decode (PIL)"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    cropped = [crop(img) for img in decoded]
    rates["random-resized crop + flip"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for x in cropped:
        randaug(x)
    rates["RandAugment (2 ops, 224 px)"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for f in files:
        strong(Image.open(f).convert("RGB"))
    rates["all of it: decode + 'strong' transform"] = n / (time.perf_counter() - t0)
    return rates


def device_steps(root: Path, n: int, device: torch.device) -> dict[str, float]:
    """Images/s of each step of the device path on ``n`` files at once: decode (nvJPEG on
    CUDA), the per-image random-resized crop to 224 px, and the batched flip + RandAugment +
    normalisation; medians of 5 after one warm-up."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from longtail.data.batch_augment import Draw
    from longtail.data.sources import IMAGENET_MEAN, IMAGENET_STD
    from longtail.data.transforms import Resize, device_transform

    files = sorted((root / "train").rglob("*.jpg"))[:n]
    data = [read_file(str(f)) for f in files]
    form = device_transform("strong", 224, 3, IMAGENET_MEAN, IMAGENET_STD, Resize(), device)
    assert form is not None

    def timed(fn) -> float:
        times = []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        del out
        return len(files) / statistics.median(times[1:])

    def draw() -> Draw:
        return Draw(torch.Generator(device=device).manual_seed(0), len(files), slice(None))

    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    cropped = form.crop(decoded, draw())
    return {
        "decode (nvJPEG)": timed(lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device=device)),
        "random-resized crop to 224 (per image)": timed(lambda: form.crop(decoded, draw())),
        "flip + RandAugment + normalise (batched)": timed(lambda: form.rest(cropped, draw())),
        "all of it": timed(
            lambda: form(decode_jpeg(data, mode=ImageReadMode.RGB, device=device), draw())
        ),  # fmt: skip
    }


def jpeg_folder(args: argparse.Namespace, device: torch.device) -> None:
    write_jpegs(args.jpeg_folder, args.images)
    recipe = "configs/folder/ce-resnet50.yaml"
    common = [f"data.root={args.jpeg_folder}", "model.pretrained=false",
              f"train.batch_size={args.batch_size}", "train.transform=strong"]  # fmt: skip
    results: dict = {
        "hardware": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },  # fmt: skip
        "commit": commit(),
        "steps": args.steps,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "runs": {},
        "data_steps": data_steps(args.jpeg_folder, 48),
    }
    if device.type == "cuda":
        results["device_steps"] = device_steps(args.jpeg_folder, 4 * args.batch_size, device)
    paths = [(0, "workers"), (args.workers, "workers"), (args.workers, "device")]
    for workers, decode in paths:
        where = "PIL per image" if decode == "workers" else "decoded on the device"
        key = f"ce-resnet50/{workers} workers, {where}"
        sets = [*common, f"data.num_workers={workers}", f"data.decode={decode}"]
        results["runs"][key] = measure(recipe, sets, args.steps, args.warmup, args.rounds, device)
        say(key, results["runs"][key], 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(results, indent=1))
    hw = results["hardware"]
    lines = [
        f"JPEG folder (500 x 375, quality 90, {args.images} images), "
        f"configs/folder/ce-resnet50.yaml at 224 px with "
        f"RandAugment ('strong'), batch {args.batch_size}; medians of {args.rounds} alternating "
        f"measurements of {args.steps} steps after {args.warmup}; {hw['device']} ({hw['cpu']}, "
        f"{hw['cores']} cores, {hw['threads']} threads), torch {hw['torch']}, commit "
        f"{results['commit']}.",
        "",
        "| loader | end to end (img/s) | bound, data in memory (img/s) | ratio | data alone "
        "(img/s) |",
        "|---|---|---|---|---|",
    ]
    for key, r in results["runs"].items():
        lines.append(f"| {key.split('/')[1]} | {r['end_to_end']:.1f} | {r['bound']:.1f} | "
                     f"{r['ratio']:.2f} | {r['data']:.1f} |")  # fmt: skip
    lines += ["", "| step of the per-image path, one process | images/s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in results["data_steps"].items()]
    if "device_steps" in results:
        lines += ["", f"| step of the device path, batches of {4 * args.batch_size} | images/s |",
                  "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.0f} |" for k, v in results["device_steps"].items()]
    (args.out / "throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
