"""Running under torchrun: one process per device, PyTorch's DistributedDataParallel.

``torchrun --nproc_per_node N -m longtail train ...`` (and torchrun's multi-node flags) set
RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` joins the process group (NCCL on CUDA, gloo on
the CPU). Rank 0 alone writes the run directory, logs and prints; the others wait for it at
barriers. The global batch (``train.batch_size``) is split evenly over the processes.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longtail import parallel


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str) -> None:
    """Join the process group that torchrun set up (a no-op for a single process)."""
    if not launched() or parallel.is_distributed():
        return
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30)
    )


def teardown() -> None:
    """Leave the process group (all processes together)."""
    if parallel.is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a distributed process at once once its work is done and flushed.

    With gloo, interpreter shutdown sometimes aborts (SIGABRT, "terminate called without an
    active exception", about 1 exit in 8 here, destroy_process_group or not) while its worker
    threads still hold tensors (pytorch/pytorch#179291); torchrun then reports the run as
    failed. Skipping the interpreter's teardown after the last barrier avoids it.
    """
    if parallel.is_distributed():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def local_device(device: torch.device) -> torch.device:
    """This process's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def is_main() -> bool:
    return parallel.rank() == 0


def is_main_from_env() -> bool:
    """Rank 0, known before the process group exists (torchrun's RANK variable)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if parallel.is_distributed():
        dist.barrier()


def sync_batch_norm(method: nn.Module) -> nn.Module:
    """BatchNorm layers that share their batch statistics over all processes (torchrun)."""
    if not parallel.is_distributed():
        return method
    return nn.SyncBatchNorm.convert_sync_batchnorm(method)


def wrap(method: nn.Module, device: torch.device) -> nn.Module:
    """The method inside DistributedDataParallel (gradients averaged over the processes).

    Build it again whenever the trainable parameters change (a new stage). Branches that a
    step skips (a zero curriculum weight) leave parameters without gradients, hence
    ``find_unused_parameters``.
    """
    if not parallel.is_distributed():
        return method
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(method, device_ids=ids, find_unused_parameters=True)


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Sum scalars over the processes."""
    if not parallel.is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Average scalars over the processes (the loss terms each one saw on its slice)."""
    summed = sum_over_processes(values)
    return {k: v / parallel.world_size() for k, v in summed.items()}


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is True on one of them."""
    if not parallel.is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (pickled), in rank order."""
    if not parallel.is_distributed():
        return [obj]
    out: list[Any] = [None] * parallel.world_size()
    dist.all_gather_object(out, obj)
    return out
