import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longtail.models import (
    CLASSIFIERS,
    CosineClassifier,
    LinearClassifier,
    ProjectionMLP,
    PrototypeBank,
    build_classifier,
)


def test_expected_classifiers_are_registered():
    assert {"linear", "cosine"} <= set(CLASSIFIERS.names())


@pytest.mark.parametrize("name", CLASSIFIERS.names())
def test_classifier_forward_backward(name):
    torch.manual_seed(0)
    head = build_classifier(name, 8, 5)
    x = torch.randn(4, 8, requires_grad=True)
    logits = head(x)
    assert logits.shape == (4, 5)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 4])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in head.named_parameters():
        assert p.grad is not None, pname


def test_unknown_classifier_lists_valid_ones():
    with pytest.raises(ValueError, match="cosine"):
        build_classifier("arcface", 8, 5)


def test_linear_is_affine():
    head = LinearClassifier(6, 3)
    x = torch.randn(5, 6)
    torch.testing.assert_close(head(x), x @ head.weight.T + head.fc.bias)
    assert LinearClassifier(6, 3, bias=False).fc.bias is None


def test_cosine_is_bounded_by_scale():
    torch.manual_seed(0)
    head = CosineClassifier(16, 10, scale=7.5)
    logits = head(100 * torch.randn(64, 16))
    assert logits.abs().max() <= 7.5 + 1e-5
    assert list(head.parameters()) == [head.weight]  # the scale is fixed


def test_cosine_hits_scale_when_aligned_and_ignores_norms():
    head = CosineClassifier(4, 3, scale=10.0)
    x = head.weight.detach()[1:2] * 123.0
    logits = head(x)
    assert logits[0, 1].item() == pytest.approx(10.0, rel=1e-5)
    torch.testing.assert_close(head(x / 100.0), logits)


def test_cosine_learned_scale():
    head = CosineClassifier(4, 3, scale=5.0, learn_scale=True)
    assert isinstance(head.scale, nn.Parameter) and head.scale.item() == 5.0
    head(torch.randn(2, 4)).sum().backward()
    assert head.scale.grad is not None
    assert "scale" in head.state_dict()


def test_cosine_fixed_scale_is_saved_but_not_learned():
    head = CosineClassifier(4, 3, scale=5.0)
    assert "scale" in head.state_dict()
    assert not isinstance(head.scale, nn.Parameter)


def test_projection_mlp_structure_and_unit_norm():
    mlp = ProjectionMLP(64, 32, 16)
    layers = list(mlp.net)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (64, 32)
    assert (layers[2].in_features, layers[2].out_features) == (32, 16)
    z = mlp(torch.randn(5, 64))
    assert z.shape == (5, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))


def test_prototype_bank_shape_and_unit_norm():
    bank = PrototypeBank(num_classes=10, num_prototypes=3, dim=8)
    assert bank.num_prototypes == 3 and bank.num_classes == 10 and bank.dim == 8
    assert bank.prototypes.shape == (10, 3, 8)
    protos = bank()
    assert protos.shape == (10, 3, 8)
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(10, 3))


def test_prototype_bank_stays_unit_norm_after_an_update():
    bank = PrototypeBank(4, 2, 5)
    optimizer = torch.optim.SGD(bank.parameters(), lr=1.0)
    (bank() * torch.randn(4, 2, 5)).sum().backward()
    optimizer.step()
    torch.testing.assert_close(bank().norm(dim=-1), torch.ones(4, 2))


def test_prototype_bank_rejects_empty():
    with pytest.raises(ValueError):
        PrototypeBank(3, 0, 4)
