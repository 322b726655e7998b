"""The contrastive branch reports when it learns nothing."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from conftest import tiny_config
from longtail import api
from longtail.config import config_from_dict
from longtail.methods import METHODS
from longtail.methods.contrastive import EmbeddingHealth, effective_rank


def test_effective_rank():
    assert effective_rank(torch.ones(8, 4)) == 0.0  # all rows equal: nothing spread
    line = torch.linspace(-1, 1, 8)[:, None] * torch.tensor([[1.0, 2.0, 0.0]])
    assert math.isclose(effective_rank(line), 1.0, rel_tol=1e-5)
    square = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
    assert math.isclose(effective_rank(square), 2.0, rel_tol=1e-5)


def test_collapsed_embeddings_at_chance_warn_and_spread_ones_do_not():
    chance = math.log(15)
    collapsed = EmbeddingHealth()
    for _ in range(3):
        collapsed.add(F.normalize(torch.ones(16, 4), dim=1), torch.tensor(chance * 0.999), chance)
    stats = collapsed.scalars()
    assert math.isclose(stats["z_cos"], 1.0, rel_tol=1e-5) and stats["z_rank"] == 0.0
    assert "chance value 2.7081" in collapsed.warning("SC")

    spread = EmbeddingHealth()
    z = F.normalize(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    spread.add(z, torch.tensor(chance * 0.999), chance)
    spread.add(z, torch.tensor(chance * 0.95), chance)  # one step clearly below chance
    assert spread.warning("SC") is None and spread.scalars()["z_cos"] < 0.5
    spread.reset()
    assert spread.scalars() == {} and spread.warning("SC") is None


def test_a_collapsed_feature_branch_is_reported(tiny_fmnist, tmp_path, monkeypatch, capsys):
    cls = METHODS.get("hybrid-sc")
    setup = cls.setup

    def collapsed_setup(self, data):
        setup(self, data)
        with torch.no_grad():  # every z equals normalize(bias): SC sits at log(N - 1)
            for layer in (self.features.projector.net[0], self.features.projector.net[-1]):
                layer.weight.zero_()
            self.features.projector.net[-1].bias.fill_(1.0)

    monkeypatch.setattr(cls, "setup", collapsed_setup)
    raw = tiny_config(
        tiny_fmnist, method={"name": "hybrid-sc"}, train={"epochs": 2, "batch_size": 8}
    )
    api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert (
        first["train/con"] == math.log(2 * 8 - 1) or abs(first["train/con"] - math.log(15)) < 1e-4
    )
    assert first["z_cos"] > 0.999 and first["z_rank"] == 0.0
    assert (
        len(first["warnings"]) == 1
        and "SC feature-branch loss sat at its chance" in first["warnings"][0]
    )
    assert (
        "warning: epoch 1: the SC feature-branch loss sat at its chance value"
        in capsys.readouterr().err
    )


def test_a_learning_branch_logs_health_without_warnings(tiny_fmnist, tmp_path):
    raw = tiny_config(tiny_fmnist, method={"name": "hybrid-psc"}, train={"epochs": 2})
    api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[0]["z_rank"] <= 16 and -1 <= rows[0]["z_cos"] <= 1
    assert "warnings" not in rows[0]
    assert "z_cos" not in rows[1]  # alpha 0: the feature branch did not run
