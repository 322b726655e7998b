"""DSCL: momentum encoder, labelled FIFO queue, PBSD's two paths, stage 2 from a stage-1 run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from longtail import api
from longtail.build import build_data, build_method, validate
from longtail.config import config_from_dict
from longtail.engine.checkpoint import load_checkpoint
from longtail.errors import UsageError
from longtail.models import LabelledQueue


def _dscl(tiny_fmnist, **method):
    raw = tiny_config(
        tiny_fmnist,
        method={"name": "dscl", "classifier_epochs": 1, **method},
        train={"epochs": 3, "batch_size": 8},
    )
    cfg = validate(config_from_dict(raw))
    torch.manual_seed(0)
    return build_method(cfg, build_data(cfg))


def _batch(b=4):
    gen = torch.Generator().manual_seed(2)
    views = [torch.randn(b, 1, 28, 28, generator=gen) for _ in range(2)]
    return {"views": (views, torch.tensor([0, 1, 1, 2])[:b], torch.arange(b))}


def test_key_encoder_is_a_momentum_copy(tiny_fmnist):
    method = _dscl(tiny_fmnist, momentum=0.9)
    for k, q in zip(method.key_backbone.parameters(), method.backbone.parameters(), strict=True):
        assert torch.equal(k, q) and not k.requires_grad
    method.on_stage_start(method.stages()[0])
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)  # as if an optimizer step moved the query encoder
    before = [p.clone() for p in method.key_backbone.parameters()]
    method.training_step(_batch(), 0)
    method.after_optimizer_step()
    for k, old, q in zip(method.key_backbone.parameters(), before, method.backbone.parameters(),
                         strict=True):  # fmt: skip
        torch.testing.assert_close(k, 0.9 * old + 0.1 * q)
    trainable = {n.split(".")[0] for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "head"}  # the classifier waits for its stage


def test_the_method_keeps_a_labelled_queue_of_queue_size(tiny_fmnist):
    method = _dscl(tiny_fmnist, queue_size=5)
    assert isinstance(method.queue, LabelledQueue) and len(method.queue) == 5
    assert method.queue.labels.tolist() == [-1] * 5  # empty slots, not random keys


def test_checkpoints_from_before_the_queue_module_still_load(tiny_fmnist):
    method = _dscl(tiny_fmnist, queue_size=5)
    method.queue.push(torch.ones(2, method.queue.keys.shape[1]), torch.tensor([3, 4]))
    state = method.state_dict()
    old = {k.replace("queue.keys", "queue").replace("queue.labels", "queue_labels")
           .replace("queue.next", "queue_next"): v for k, v in state.items()}  # fmt: skip
    fresh = _dscl(tiny_fmnist, queue_size=5)
    fresh.load_state_dict(old)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_a_step_queues_its_keys_after_the_loss(tiny_fmnist):
    method = _dscl(tiny_fmnist, queue_size=16)
    method.on_stage_start(method.stages()[0])
    terms = method.training_step(_batch(), 0)
    assert set(terms) == {"loss", "dscl", "pbsd"}
    assert (method.queue.labels == -1).all()  # the loss saw an empty queue
    method.after_optimizer_step()
    assert method.queue.labels.tolist()[:4] == [0, 1, 1, 2]


def test_pbsd_gradient_reaches_only_the_student_path(tiny_fmnist):
    method = _dscl(tiny_fmnist)
    method.on_stage_start(method.stages()[0])
    (x_q, _), _, _ = _batch()["views"]
    fmap = method.backbone.forward_features(x_q)
    fmap.retain_grad()
    k = torch.nn.functional.normalize(torch.randn(4, method.queue.keys.shape[1]), dim=1)
    # with an empty queue each patch scores one key only and PBSD is 0: fill it first
    method.queue.push(
        torch.nn.functional.normalize(torch.randn(12, k.shape[1]), dim=1), torch.arange(12) % 3
    )
    method._pbsd(x_q, fmap, k).backward()
    assert fmap.grad is None  # the teacher (pooled from the feature map) is a target only
    grads = [p.grad for p in method.backbone.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_boxes_lie_in_the_view_with_the_set_area(tiny_fmnist):
    method = _dscl(tiny_fmnist, patches=7, patch_scale=(0.1, 0.3))
    torch.manual_seed(0)
    boxes = method.boxes(50, 28, 32, torch.device("cpu"))
    assert boxes.shape == (350, 4)
    x0, y0, x1, y1 = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 32).all() and (y1 <= 28).all()
    area = (x1 - x0) * (y1 - y0) / (28 * 32)
    assert area.min() >= 0.1 * 0.7 and area.max() <= 0.3 + 1e-6  # clipping only shrinks


def test_pbsd_off_is_the_dscl_ablation(tiny_fmnist):
    method = _dscl(tiny_fmnist, pbsd_weight=0.0)
    method.on_stage_start(method.stages()[0])
    terms = method.training_step(_batch(), 0)
    assert set(terms) == {"loss", "dscl"} and torch.equal(terms["loss"], terms["dscl"])


@pytest.mark.parametrize("name", ["two-stage-sc", "dscl"])
def test_the_classifier_stage_can_start_from_a_finished_first_stage(name, tiny_fmnist, tmp_path):
    base = tiny_config(
        tiny_fmnist,
        method={"name": name, "classifier_epochs": 1},
        train={"epochs": 3, "batch_size": 8},
    )
    api.train(config_from_dict(base), tmp_path / "first", progress=False)
    first = load_checkpoint(tmp_path / "first" / "checkpoints" / "last.pt")["model"]

    second = {**base, "method": {**base["method"], "from_run": str(tmp_path / "first"),
                                 "classifier_epochs": 2, "classifier_lr": 0.05}}  # fmt: skip
    api.train(config_from_dict(second), tmp_path / "second", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["classifier", "classifier"]
    state = load_checkpoint(tmp_path / "second" / "checkpoints" / "last.pt")["model"]
    for k, v in first.items():
        if k.startswith("classifier."):
            assert not torch.equal(v, state[k]), k  # a classifier of its own
        else:
            assert torch.equal(v, state[k]), k  # stage 1's encoder, frozen

    with pytest.raises(UsageError, match="from_run.*no checkpoint"):
        bad = {**second, "method": {**second["method"], "from_run": str(tmp_path / "none")}}
        api.train(config_from_dict(bad), tmp_path / "third", progress=False)


def test_from_run_needs_a_finished_first_stage(tiny_fmnist, tmp_path, monkeypatch):
    from longtail.methods import METHODS

    base = tiny_config(
        tiny_fmnist,
        method={"name": "dscl", "classifier_epochs": 1, "pbsd_weight": 0.0},
        train={"epochs": 4, "batch_size": 8},
    )

    def stop(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(METHODS.get("dscl"), "on_epoch_start", stop)
    with pytest.raises(KeyboardInterrupt):
        api.train(config_from_dict(base), tmp_path / "first", progress=False)
    monkeypatch.undo()
    second = {**base, "method": {**base["method"], "from_run": str(tmp_path / "first")}}
    with pytest.raises(UsageError, match="stopped at epoch 1 of its first stage's 3") as error:
        api.train(config_from_dict(second), tmp_path / "second", progress=False)
    # the fix is spelt for whoever reads it: the API's argument, the command line's flag
    assert str(error.value).endswith("train it again with resume=True)")
    assert error.value.for_cli().endswith("train it again with --resume)")
