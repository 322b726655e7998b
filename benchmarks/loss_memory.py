"""Peak memory and time of the contrastive losses (forward + backward only) on CPU.

Each (implementation, size) runs in a fresh subprocess so that its peak RSS is clean:
extra memory = peak RSS (VmHWM, reset just before the loss) minus the RSS right before the
loss call (inputs already allocated, threads warmed up on a tiny batch).

    nice python benchmarks/loss_memory.py --sizes 1024 2048 4096 8192 16384 32768 65536

Writes ``<out>/loss_memory.json`` and ``<out>/loss_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
IMPLEMENTATIONS = ("sc_direct", "sc_blockwise", "psc")
#: float32 N x N matrices alive at the direct SC's peak (measured 5.0 at N = 8,192 and
#: 16,384; rounded up so the budget check errs on the safe side).
DIRECT_MATRICES = 7.0


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _meminfo_kb(field: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _hardware() -> dict:
    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(_meminfo_kb("MemTotal") / 2**20, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def direct_estimate_gb(n_rows: int) -> float:
    """Rough peak of the direct SC path: DIRECT_MATRICES float32 N x N matrices."""
    return DIRECT_MATRICES * 4 * n_rows**2 / 1e9


# --------------------------------------------------------------------------------------------
# Worker: one implementation, one size, in its own process.
# --------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(SRC))
    import torch
    import torch.nn.functional as F

    from longtail.losses import psc_loss, sup_con_loss

    def make_loss(n_rows: int, block: int):
        gen = torch.Generator().manual_seed(0)
        images = n_rows // 2
        labels = torch.randint(0, args.classes, (images,), generator=gen).repeat(2)
        z = F.normalize(torch.randn(n_rows, args.dim, generator=gen), dim=1).requires_grad_()
        protos = F.normalize(torch.randn(args.classes, args.dim, generator=gen), dim=1)
        protos.requires_grad_()
        if args.impl == "sc_direct":
            return z, lambda: sup_con_loss(z, labels, args.temperature, block_size=None)
        if args.impl == "sc_blockwise":
            return z, lambda: sup_con_loss(z, labels, args.temperature, block_size=block)
        return z, lambda: psc_loss(z, labels, protos, args.temperature)

    # Warm up thread pools and lazy initialisation on a tiny batch (blockwise path included).
    warm_z, warm_fn = make_loss(64, block=16)
    warm_fn().backward()
    del warm_z, warm_fn

    z, loss_fn = make_loss(2 * args.images, block=args.block_size)
    baseline_kb = _proc_status_kb("VmRSS")
    peak_reset = _reset_peak_rss()
    walls, cpus, value = [], [], None
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        loss = loss_fn()
        loss.backward()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        value = loss.item()
        z.grad = None
        del loss
    peak_kb = _proc_status_kb("VmHWM")
    return {
        "impl": args.impl,
        "images": args.images,
        "rows": 2 * args.images,
        "dim": args.dim,
        "classes": args.classes,
        "block_size": args.block_size if args.impl == "sc_blockwise" else None,
        "repeats": args.repeats,
        "wall_s": walls,
        "wall_s_median": statistics.median(walls),
        "cpu_s_median": statistics.median(cpus),
        "baseline_rss_mb": baseline_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "extra_peak_mb": (peak_kb - baseline_kb) / 1024,
        "peak_reset": peak_reset,
        "loss": value,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _run_one(args: argparse.Namespace, impl: str, images: int, repeats: int) -> dict:
    options = {
        "--impl": impl,
        "--images": images,
        "--dim": args.dim,
        "--classes": args.classes,
        "--repeats": repeats,
        "--temperature": args.temperature,
        "--block-size": args.block_size,
    }
    cmd = [sys.executable, __file__, "--worker"]
    for flag, value in options.items():
        cmd += [flag, str(value)]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"impl": impl, "images": images, "rows": 2 * images, "error": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["loadavg_1m_before"] = load_before
    return result


def _markdown(results: list[dict], hardware: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Contrastive loss memory and time (forward + backward, CPU)",
        "",
        f"CPU: {hardware['cpu_model']}, {hardware['usable_cpus']} usable cores, "
        f"{hardware['mem_total_gib']} GiB RAM; torch {hardware['torch']}, "
        f"{hardware['torch_threads']} threads. d = {args.dim}, 2 views per image, "
        f"tau = {args.temperature}, PSC with C = {args.classes}, "
        f"blockwise block_size = {args.block_size}.",
        "Extra peak = peak RSS minus RSS just before the loss call (inputs allocated). "
        "Time = median wall seconds over the repeats (CPU seconds alongside: the machine is "
        "shared, so wall time includes waiting for cores).",
        "",
        "| images | rows N | implementation | extra peak (MB) | wall (s) | CPU (s) | repeats "
        "| loss | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if "extra_peak_mb" in r:
            lines.append(
                f"| {r['images']:,} | {r['rows']:,} | {r['impl']} | {r['extra_peak_mb']:,.0f} "
                f"| {r['wall_s_median']:.2f} | {r['cpu_s_median']:.2f} | {r['repeats']} "
                f"| {r['loss']:.5f} | load {r['loadavg_1m_before']:.1f} |"
            )
        else:
            note = r.get("skipped") or ("error: " + r["error"].strip().splitlines()[-1])
            lines.append(
                f"| {r['images']:,} | {r['rows']:,} | {r['impl']} | - | - | - | - | - | {note} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="images (2 views)"
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=IMPLEMENTATIONS)
    parser.add_argument(
        "--max-direct-gb",
        type=float,
        default=12.0,
        help="skip direct SC when its N x N matrices would exceed this many GB",
    )
    parser.add_argument(
        "--repeat-up-to",
        type=int,
        default=8192,
        help="sizes up to this many images take the median of 3 runs, larger ones 1 run",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    # Worker-only options.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(args)))
        return

    hardware = _hardware()
    results = []
    for images in args.sizes:
        rows = 2 * images
        repeats = 3 if images <= args.repeat_up_to else 1
        for impl in args.impls:
            if impl == "sc_direct":
                estimate = direct_estimate_gb(rows)
                available = _meminfo_kb("MemAvailable") * 1024 / 1e9
                if estimate > args.max_direct_gb or estimate > 0.7 * available:
                    why = (
                        f"skipped: needs ~{estimate:.1f} GB (budget {args.max_direct_gb} GB, "
                        f"{available:.1f} GB available)"
                    )
                    results.append({"impl": impl, "images": images, "rows": rows, "skipped": why})
                    print(f"{images:>6} {impl:<13} {why}", flush=True)
                    continue
            result = _run_one(args, impl, images, repeats)
            results.append(result)
            if "extra_peak_mb" in result:
                print(
                    f"{images:>6} {impl:<13} extra {result['extra_peak_mb']:9.1f} MB  "
                    f"wall {result['wall_s_median']:8.2f} s  cpu {result['cpu_s_median']:8.2f} s",
                    flush=True,
                )
            else:
                print(f"{images:>6} {impl:<13} FAILED\n{result['error']}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in ("worker", "impl", "images", "repeats")
    }
    payload = {"hardware": hardware, "settings": settings, "results": results}
    (args.out / "loss_memory.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "loss_memory.md").write_text(_markdown(results, hardware, args))
    print(f"wrote {args.out / 'loss_memory.json'} and {args.out / 'loss_memory.md'}")


if __name__ == "__main__":
    main()
