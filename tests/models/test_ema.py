"""The momentum encoder and the labelled queue that MoCo-style methods share."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longtail.losses.common import EMPTY as LOSS_EMPTY
from longtail.models import EMPTY, LabelledQueue, ProjectionMLP, momentum_copy, momentum_update


def test_a_momentum_copy_follows_every_parameter_by_ema_and_no_buffer():
    torch.manual_seed(0)
    query = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), ProjectionMLP(8, 6, 3, True))
    key = momentum_copy(query)
    assert all(not p.requires_grad for p in key.parameters())
    assert all(p.requires_grad for p in query.parameters())
    before = {n: p.clone() for n, p in key.named_parameters()}
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
        query[1].running_mean.fill_(5.0)
    momentum_update(key, query, 0.9)
    for n, p in query.named_parameters():  # the head's parameters too, not only the first
        torch.testing.assert_close(dict(key.named_parameters())[n], 0.9 * before[n] + 0.1 * p)
    assert torch.equal(key[1].running_mean, torch.zeros(8))  # its own statistics
    with pytest.raises(ValueError, match="differ in parameters"):
        momentum_update(key, nn.Linear(4, 8), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(key, query, 1.5)


def test_queue_is_fifo_with_labels_and_wraps_around():
    queue = LabelledQueue(5, 3)
    assert queue.labels.tolist() == [EMPTY] * 5 and queue.filled() == 0
    assert EMPTY == LOSS_EMPTY  # the losses leave out the slots the queue calls empty
    keys = torch.arange(1.0, 9.0)[:, None].expand(8, 3)
    queue.push(keys[:3], torch.tensor([0, 1, 2]))
    assert queue.labels.tolist() == [0, 1, 2, -1, -1] and queue.filled() == 3
    queue.push(keys[3:7], torch.tensor([3, 4, 5, 6]))
    assert queue.keys[:, 0].tolist() == [6.0, 7.0, 3.0, 4.0, 5.0]
    assert queue.labels.tolist() == [5, 6, 2, 3, 4]  # labels stay with their keys
    assert int(queue.next) == 2
    queue.push(keys[:7], torch.arange(7))  # more keys than slots: the newest 5 stay
    assert sorted(queue.keys[:, 0].tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]
    pairs = dict(zip(queue.labels.tolist(), queue.keys[:, 0].tolist(), strict=True))
    assert pairs == {2: 3.0, 3: 4.0, 4: 5.0, 5: 6.0, 6: 7.0}
    assert set(queue.state_dict()) == {"keys", "labels", "next"}
    empty = LabelledQueue(0, 3)
    empty.push(keys[:2], torch.tensor([0, 1]))  # a queue of size 0 holds nothing
    assert empty.filled() == 0
