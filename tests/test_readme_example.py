"""The README's MoCo-style method, built from the shared parts, runs as written; its result
tables are those of the files they name."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from conftest import tiny_config
from longtail import api
from longtail.build import build_data, build_method, validate
from longtail.config import config_from_dict
from longtail.engine.checkpoint import load_checkpoint
from longtail.engine.trainer import build_optimizer
from longtail.methods import METHODS, register_method

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> dict:
    text = README.read_text()
    block = text.split("<!-- moco-example -->")[1].split("<!-- end -->")[0]
    code = block.split("```python")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "README.md (moco-example)", "exec"), namespace)  # noqa: S102
    return namespace


def test_the_readme_moco_style_method_trains_from_the_shared_parts(tiny_fmnist, tmp_path):
    cls = _example()["QueueContrast"]
    register_method("queue-contrast", cls, description="README example", paper="-")
    try:
        raw = tiny_config(
            tiny_fmnist,
            method={"name": "queue-contrast", "queue_size": 32, "momentum": 0.9},
            train={"epochs": 2, "batch_size": 8},
            optim={"decay_exempt": True, "weight_decay": 5e-4},
        )
        api.train(config_from_dict(raw), tmp_path / "run", progress=False)
        state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
        assert int((state["queue.labels"] >= 0).sum()) == 32  # the queue filled with keys
        moved = [k for k in state if k.startswith("key_head.")]
        assert moved and any(
            not torch.equal(state[k], state[k.replace("key_head.", "head.")]) for k in moved
        )  # the key encoder follows by EMA, not equal to the query's
        cfg = validate(config_from_dict(raw))
        method = build_method(cfg, build_data(cfg))
        opt = build_optimizer(method, cfg.optim)
        decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        assert decay[id(method.centres.prototypes)] == 0.0  # centres: no weight decay
        assert decay[id(method.head.net[0].weight)] == 5e-4
    finally:
        METHODS._entries.pop("queue-contrast", None)
        METHODS._meta.pop("queue-contrast", None)


def test_each_result_table_in_the_readme_is_its_files():
    """A block ``<!-- name: PATH -->`` ... ``<!-- /name -->`` holds lines of PATH (a result
    written by a benchmark or a study report), in its order: a number edited by hand, or a
    file regenerated without the README, fails here."""
    text = README.read_text()
    blocks = re.findall(r"<!-- ([\w-]+): (\S+) -->\n(.*?)<!-- /\1 -->", text, re.S)
    assert {name for name, _, _ in blocks} >= {"full-table", "quick-study", "throughput"}
    for name, path, block in blocks:
        source = (README.parent / path).read_text().splitlines()
        lines = [line for line in block.splitlines() if line.strip()]
        assert any(line.startswith("|") for line in lines), f"{name}: no table"
        at = [source.index(line) if line in source else -1 for line in lines]
        missing = [line for line, i in zip(lines, at, strict=True) if i < 0]
        assert not missing, f"{name}: not in {path}: {missing[0][:120]}"
        assert at == sorted(at), f"{name}: lines out of {path}'s order"
