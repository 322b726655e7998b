import math

import pytest

from longtail.config import OptimConfig
from longtail.engine.schedules import learning_rate
from longtail.methods.curriculum import curriculum_alpha


def test_multistep_with_warmup():
    cfg = OptimConfig(
        lr=0.1,
        schedule="multistep",
        milestones=[160, 180],
        gamma=0.1,
        warmup_epochs=5,
        warmup_start_factor=0.0,
    )
    assert learning_rate(cfg, 0.0, 200) == 0.0
    assert learning_rate(cfg, 2.5, 200) == pytest.approx(0.05)
    assert learning_rate(cfg, 5.0, 200) == pytest.approx(0.1)
    assert learning_rate(cfg, 159.99, 200) == pytest.approx(0.1)
    assert learning_rate(cfg, 160.0, 200) == pytest.approx(0.01)
    assert learning_rate(cfg, 199.5, 200) == pytest.approx(0.001)


def test_cosine_reaches_floor():
    cfg = OptimConfig(lr=0.2, schedule="cosine", min_lr=0.0)
    assert learning_rate(cfg, 0, 10) == pytest.approx(0.2)
    assert learning_rate(cfg, 5, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 10, 10) == pytest.approx(0.0, abs=1e-12)


def test_curricula():
    # T counts epochs from 1, so the last epoch of parabolic/linear is pure classifier learning.
    assert curriculum_alpha("parabolic", 0, 200) == pytest.approx(1 - (1 / 200) ** 2)
    assert curriculum_alpha("parabolic", 99, 200) == pytest.approx(0.75)
    assert curriculum_alpha("parabolic", 199, 200) == 0.0
    assert curriculum_alpha("linear", 49, 100) == pytest.approx(0.5)
    assert curriculum_alpha("constant", 10, 100, value=0.3) == 0.3
    values = [curriculum_alpha("parabolic", e, 50) for e in range(50)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in values)
    with pytest.raises(ValueError, match="parabolic"):
        curriculum_alpha("cubic", 0, 10)
