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
from longtail.data import KPerClassBatchSampler, build_sampler, set_loader_epoch
from longtail.methods import METHODS
from method_references import section

SRC = Path(__file__).resolve().parents[1] / "src"

# Run by torchrun in each of 2 processes: for every method and every stage, the loss and the
# gradients (float64) of this process's half of a fixed global batch, inside
# DistributedDataParallel, the epoch loss as the engine logs it (averaged over the processes),
# and the queues after the step; saved by rank 0.
STEP = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from longtail.build import build_data, build_method, validate
    from longtail.config import config_from_dict
    from longtail.engine import distributed

    configs, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    all_batches = torch.load(sys.argv[4])
    distributed.setup("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    part = lambda t: t.chunk(world)[rank]
    results = {}
    for name, raw in configs.items():
        cfg = validate(config_from_dict(raw))
        torch.manual_seed(0)
        method = build_method(cfg, build_data(cfg)).double().eval()
        epoch = 0
        for i, stage in enumerate(method.stages()):
            method.on_stage_start(stage)
            method.eval()
            method.on_epoch_start(epoch)
            local = {k: ([part(v) for v in x] if isinstance(x, list) else part(x), part(y), part(j))
                     for k, (x, y, j) in all_batches[name][i].items()}
            model = distributed.wrap(method, torch.device("cpu"))
            method.zero_grad(set_to_none=True)
            terms = model(local, epoch)
            terms["loss"].backward()
            method.after_optimizer_step()
            losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
            dist.all_gather(losses, terms["loss"].detach())
            logged = distributed.mean_over_processes({"loss": float(terms["loss"])})["loss"]
            grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
            buffers = {n: b.clone() for n, b in method.named_buffers() if n.startswith("queue")}
            results[(name, i)] = {"loss": torch.stack(losses).mean(), "logged": logged,
                                  "grads": grads, "buffers": buffers}
            epoch += stage.epochs
    if rank == 0:
        torch.save(results, out)
    distributed.exit_process(0)
    """
)


def _torchrun(tmp: Path, script: str, *args: str, n: int = 2) -> subprocess.CompletedProcess:
    path = tmp / "script.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(n), str(path), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _config(root: Path, name: str) -> dict:
    return tiny_config(root, method=section(name), train={"epochs": 4, "batch_size": 8})


def _stage_batches(method, data) -> list[dict]:
    """One global batch (float64) from each loader of each of the method's stages."""
    out, epoch = [], 0
    for stage in method.stages():
        method.on_stage_start(stage)
        batches = {}
        for k, loader in method.loaders(data, stage).items():
            set_loader_epoch(loader, epoch)
            x, y, j = next(iter(loader))
            x = [v.double() for v in x] if isinstance(x, list) else x.double()
            batches[k] = (x, y, j)
        out.append(batches)
        epoch += stage.epochs
    return out


def _single_process(raw: dict, batches: list[dict]) -> list[dict]:
    """What one process computes on each stage's whole global batch."""
    cfg = validate(config_from_dict(raw))
    torch.manual_seed(0)
    method = build_method(cfg, build_data(cfg)).double().eval()
    out, epoch = [], 0
    for stage, stage_batches in zip(method.stages(), batches, strict=True):
        method.on_stage_start(stage)
        method.eval()
        method.on_epoch_start(epoch)
        method.zero_grad(set_to_none=True)
        loss = method(stage_batches, epoch)["loss"]
        loss.backward()
        method.after_optimizer_step()
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in method.named_buffers() if n.startswith("queue")}
        out.append({"loss": loss.detach(), "grads": grads, "buffers": buffers})
        epoch += stage.epochs
    return out


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory):
    """Every registered method's steps, computed by two processes (one torchrun for all)."""
    tmp = tmp_path_factory.mktemp("ddp")
    root = make_fashion_mnist(tmp / "fm")
    configs, batches = {}, {}
    for name in METHODS.names():
        configs[name] = _config(root, name)
        cfg = validate(config_from_dict(configs[name]))
        data = build_data(cfg)
        torch.manual_seed(0)
        batches[name] = _stage_batches(build_method(cfg, data), data)
    (tmp / "cfg.json").write_text(json.dumps(configs))
    torch.save(batches, tmp / "batches.pt")
    done = _torchrun(tmp, STEP, str(tmp / "cfg.json"), str(tmp / "ddp.pt"), str(SRC),
                     str(tmp / "batches.pt"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return configs, batches, torch.load(tmp / "ddp.pt")


@pytest.mark.parametrize("name", METHODS.names())
def test_two_processes_give_the_single_process_loss_and_gradients(name, two_process_steps):
    configs, batches, ddp = two_process_steps
    single = _single_process(configs[name], batches[name])
    for i, one in enumerate(single):
        two = ddp[(name, i)]
        # In float64 the two differ only by the order of sums: equal far below 1e-6. A loss
        # summed over the processes, or gradients of the wrong scale, are off by a factor.
        torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-10, atol=1e-10)
        assert two["logged"] == pytest.approx(float(one["loss"]), rel=1e-10)
        assert one["grads"].keys() == two["grads"].keys() and one["grads"], (name, i)
        for n, g in one["grads"].items():
            torch.testing.assert_close(two["grads"][n], g, rtol=1e-9, atol=1e-10, msg=n)
        for n, b in two["buffers"].items():  # DSCL: every process queued the global batch's keys
            torch.testing.assert_close(b, one["buffers"][n], msg=n)


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


def test_torchrun_with_a_batch_that_does_not_split_says_so_once(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm")
    out = tmp_path / "runs" / "x"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "longtail", "train", "--set", f"data.root={root}", "--set", "train.batch_size=3",
           "--set", "model.backbone=convnet-tiny", "--set", "train.device=cpu", "--out", str(out),
           "--no-progress"]  # fmt: skip
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode != 0
    ours = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert ours == [
        "error: config key 'train.batch_size': a global batch of 3 does not split over 2 "
        "processes; use a multiple of 2"
    ]
    assert not (tmp_path / "runs").exists()


# Rank 1 alone receives SIGTERM as its 2nd step of epoch 2 starts (step index 1); the ranks
# ask each other only at step indices that are multiples of log_every (2): both stop after
# step index 2, 3 steps done.
SIGTERM_ONE_RANK = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    from longtail.methods import METHODS
    cls = METHODS.get("ce")
    step, seen = cls.training_step, {}
    def term(self, b, e):
        seen[e] = seen.get(e, 0) + 1
        if os.environ["RANK"] == "1" and (e, seen[e]) == (1, 2):
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, b, e)
    cls.training_step = term
    sys.argv = ["longtail", "train", "--config", sys.argv[1], "--out", sys.argv[2],
                "--no-progress"]
    from longtail.entry import main
    main()
    """
)


def test_sigterm_to_one_process_stops_all_at_the_same_step_and_resumes(tmp_path):
    import yaml

    root = make_fashion_mnist(tmp_path / "fm")
    raw = tiny_config(root, train={"epochs": 3, "batch_size": 8, "log_every": 2})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

    def longtail(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "longtail", *args, "--no-progress"]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    full = longtail("train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "run"
    done = _torchrun(tmp_path, SIGTERM_ONE_RANK, str(tmp_path / "c.yaml"), str(out), str(SRC))
    assert done.returncode != 0
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["partial"]["epoch"] == 1 and ckpt["partial"]["step"] == 3
    assert "stopped by SIGTERM in epoch 2 after step 3" in done.stderr
    resumed = longtail("train", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in a:  # the same two processes, the same steps: the same weights
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
