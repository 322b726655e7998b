"""Several processes (torchrun, gloo on the CPU) train as one does on the global batch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_fashion_mnist, tiny_config
from longtail import api
from longtail.build import build_data, build_method, validate
from longtail.config import config_from_dict
from longtail.data import KPerClassBatchSampler, build_sampler

SRC = Path(__file__).resolve().parents[1] / "src"

# Run by torchrun in each of 2 processes: the method's loss and gradients (in float64) on this
# process's half of a fixed global batch, inside DistributedDataParallel, saved by rank 0.
STEP = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from longtail.build import build_data, build_method, validate
    from longtail.config import config_from_dict
    from longtail.engine import distributed

    raw, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    distributed.setup("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = validate(config_from_dict(raw))
    torch.manual_seed(0)
    method = build_method(cfg, build_data(cfg)).double().eval()
    method.on_stage_start(method.stages()[0])
    method.on_epoch_start(0)
    batches = torch.load(sys.argv[4])
    part = lambda t: t.chunk(world)[rank]
    local = {k: ([part(v) for v in x] if isinstance(x, list) else part(x), part(y), part(j))
             for k, (x, y, j) in batches.items()}
    model = distributed.wrap(method, torch.device("cpu"))
    terms = model(local, 0)
    terms["loss"].backward()
    method.after_optimizer_step()
    losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(losses, terms["loss"].detach())
    if rank == 0:
        grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
        buffers = {n: b for n, b in method.named_buffers() if n.startswith("queue")}
        torch.save({"loss": torch.stack(losses).mean(), "grads": grads, "buffers": buffers}, out)
    distributed.exit_process(0)
    """
)


def _global_batch(name: str, b: int = 8):
    gen = torch.Generator().manual_seed(5)
    views = [torch.randn(b, 1, 28, 28, generator=gen, dtype=torch.float64) for _ in range(3)]
    y = torch.tensor([0, 3, 3, 9, 5, 0, 1, 3])[:b]
    idx = torch.arange(b)
    return {
        "con": (views[:2], y, idx),
        "cls": (views[2], y.flip(0), idx),
        "views": (views[:2] if name.startswith("dscl") else views, y, idx),  # DSCL: query and key
    }


def _torchrun(tmp: Path, script: str, *args: str, n: int = 2) -> subprocess.CompletedProcess:
    path = tmp / "script.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), str(path), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


METHODS_IN_BATCH = {
    "hybrid-sc": {},
    "hybrid-psc": {},
    "hybrid-mpsc": {"num_prototypes": 2},
    "bcl": {"cls_transform": "hybrid", "con_transforms": ["hybrid", "hybrid"]},
    # PBSD's boxes are drawn for the global batch, so they too are the single process's.
    "dscl": {"classifier_epochs": 1, "queue_size": 32},
    "dscl-no-pbsd": {"name": "dscl", "pbsd_weight": 0.0, "classifier_epochs": 1, "queue_size": 32},
    "ce": {},
}


@pytest.mark.parametrize("name", list(METHODS_IN_BATCH))
def test_two_processes_give_the_single_process_loss_and_gradients(name, tiny_fmnist, tmp_path):
    raw = tiny_config(tiny_fmnist, method={"name": name, **METHODS_IN_BATCH[name]},
                      train={"epochs": 3, "batch_size": 8})  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    batches = _global_batch(name)
    torch.save(batches, tmp_path / "batches.pt")
    done = _torchrun(tmp_path, STEP, str(tmp_path / "cfg.json"), str(tmp_path / "ddp.pt"), str(SRC),
                     str(tmp_path / "batches.pt"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt")

    cfg = validate(config_from_dict(raw))
    torch.manual_seed(0)
    method = build_method(cfg, build_data(cfg)).double().eval()
    method.on_stage_start(method.stages()[0])
    method.on_epoch_start(0)
    loss = method(batches, 0)["loss"]
    loss.backward()
    method.after_optimizer_step()
    # In float64 the two differ only by the order of sums: equal far below 1e-6.
    torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-10, atol=1e-10)
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    assert grads.keys() == ddp["grads"].keys()
    for n, g in grads.items():
        torch.testing.assert_close(ddp["grads"][n], g, rtol=1e-9, atol=1e-10, msg=n)
    for n, b in ddp["buffers"].items():  # DSCL: every process queued the global batch's keys
        torch.testing.assert_close(b, dict(method.named_buffers())[n], msg=n)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", ["instance", "class-balanced", "reversed", "progressive"])
def test_shards_partition_each_global_batch(name, world):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [60, 30, 12, 6]))
    batch = 12
    whole = build_sampler(name, labels, seed=3, total_epochs=5)
    whole.set_epoch(2)
    steps = len(labels) // batch
    expected = np.asarray(list(whole))[: steps * batch].reshape(steps, batch)
    shards = []
    for r in range(world):
        s = build_sampler(name, labels, seed=3, total_epochs=5).shard(r, world, batch)
        s.set_epoch(2)
        shards.append(np.asarray(list(s)).reshape(steps, batch // world))
        assert len(s) == steps * batch // world
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), expected)
    # class balance is the single process's: class-balanced draws stay balanced overall
    if name == "class-balanced":
        drawn = np.bincount(labels[np.concatenate(shards, axis=1).ravel()], minlength=4)
        assert drawn.min() > 0.5 * drawn.mean()


def test_k_per_class_shards():
    labels = np.repeat(np.arange(4), [40, 20, 10, 5])
    whole = list(KPerClassBatchSampler(labels, 8, 2, seed=1))
    parts = [list(KPerClassBatchSampler(labels, 8, 2, seed=1).shard(r, 2)) for r in range(2)]
    assert [a + b for a, b in zip(*parts, strict=True)] == whole


def test_torchrun_resumes_a_single_process_run_and_counts_each_test_image_once(
    tmp_path, monkeypatch
):
    from longtail.methods import METHODS

    root = make_fashion_mnist(tmp_path / "fm", test_per_class=7)  # 70 test images: odd shards
    out = tmp_path / "run"
    train = {"epochs": 3, "batch_size": 16, "report": True}
    raw = tiny_config(root, method={"name": "hybrid-sc"}, train=train)

    def stop(self, epoch):  # one process trains epoch 1, then is interrupted
        if epoch == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(METHODS.get("hybrid-sc"), "on_epoch_start", stop)
        with pytest.raises(KeyboardInterrupt):
            api.train(config_from_dict(raw), out, progress=False)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "longtail", "train", "--out", str(out), "--resume", "--no-progress"]  # fmt: skip
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test top-1") == 1  # rank 0 reports, once
    assert done.stdout.count("report: ") == 1 and (out / "report.html").is_file()
    assert len(list((out / "plots").glob("*.png"))) == 6  # the embedding's pass was shared
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # written once per epoch, by rank 0
    res = json.loads((out / "eval_test.json").read_text())
    assert res["num_samples"] == 70 and sum(map(sum, res["confusion"])) == 70
    # one process evaluating the checkpoint the two wrote agrees with them
    res1 = api.evaluate_run(out, save=False)
    assert res1["num_samples"] == 70 and res1["per_class"] == res["per_class"]
