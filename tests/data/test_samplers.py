import numpy as np
import pytest
import torch

from longtail.data.samplers import (
    SAMPLERS,
    EpochSampler,
    KPerClassBatchSampler,
    build_sampler,
)

COUNTS = np.array([500, 200, 50, 10])


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(0).permutation(np.repeat(np.arange(4), COUNTS))


def _expected(name):
    n = COUNTS.astype(float)
    w = {
        "instance": n,
        "class-balanced": np.ones(4),
        "sqrt": np.sqrt(n),
        "reversed": n.max() / n,
    }[name]
    return w / w.sum()


def test_registry_names():
    assert SAMPLERS.names() == ["class-balanced", "instance", "progressive", "reversed", "sqrt"]
    with pytest.raises(ValueError, match="unknown sampler 'balanced'; valid: class-balanced"):
        build_sampler("balanced", np.zeros(3, int))
    with pytest.raises(TypeError, match="unknown sampler option"):
        build_sampler("sqrt", np.zeros(3, int), epochs=3)
    for name in SAMPLERS:
        assert SAMPLERS.get(name).name == name


@pytest.mark.parametrize("name", ["instance", "class-balanced", "sqrt", "reversed"])
def test_class_frequencies(labels, name):
    s = build_sampler(name, labels, num_samples=40_000, seed=3, total_epochs=10)
    assert isinstance(s, EpochSampler) and len(s) == 40_000
    np.testing.assert_allclose(s.class_probabilities(), _expected(name))
    drawn = np.asarray(list(s))
    assert drawn.min() >= 0 and drawn.max() < len(labels)
    observed = np.bincount(labels[drawn], minlength=4)
    expected = _expected(name) * len(drawn)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 25  # 3 degrees of freedom: p < 1e-4 for a correct sampler
    # Within a class, images are drawn uniformly: the smallest class's 10 images all appear.
    assert set(drawn[labels[drawn] == 3]) == set(np.flatnonzero(labels == 3))


def test_instance_is_a_permutation(labels):
    s = build_sampler("instance", labels)
    assert sorted(s) == list(range(len(labels)))
    more = np.bincount(list(build_sampler("instance", labels, num_samples=2 * len(labels) + 5)))
    assert set(more.tolist()) <= {2, 3}


@pytest.mark.parametrize("name", ["instance", "class-balanced", "sqrt", "reversed", "progressive"])
def test_deterministic_per_seed_and_epoch(labels, name):
    a = build_sampler(name, labels, seed=7, total_epochs=4)
    b = build_sampler(name, labels, seed=7, total_epochs=4)
    first = list(a)
    assert first == list(b) == list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(build_sampler(name, labels, seed=8, total_epochs=4)) != first


def test_progressive_interpolates(labels):
    s = build_sampler("progressive", labels, total_epochs=10)
    np.testing.assert_allclose(s.class_probabilities(), _expected("instance"))
    s.set_epoch(5)
    mid = 0.5 * _expected("instance") + 0.5 * _expected("class-balanced")
    np.testing.assert_allclose(s.class_probabilities(), mid)
    for t in (10, 25):
        s.set_epoch(t)
        np.testing.assert_allclose(s.class_probabilities(), _expected("class-balanced"))
    s = build_sampler("progressive", labels, total_epochs=10, num_samples=20_000)
    s.set_epoch(10)
    freq = np.bincount(labels[list(s)], minlength=4) / 20_000
    np.testing.assert_allclose(freq, 0.25, atol=0.015)
    with pytest.raises(ValueError, match="total_epochs"):
        build_sampler("progressive", labels)


def test_classes_without_images_are_never_drawn():
    labels = np.array([0, 0, 0, 2])  # class 1 empty
    for name in ("class-balanced", "reversed", "sqrt"):
        p = build_sampler(name, labels).class_probabilities()
        assert p[1] == 0 and np.isclose(p.sum(), 1)
    balanced = build_sampler("class-balanced", labels).class_probabilities()
    np.testing.assert_allclose(balanced, [0.5, 0, 0.5])


def test_works_with_dataloader(labels):
    ds = torch.utils.data.TensorDataset(torch.arange(len(labels)))
    s = build_sampler("class-balanced", labels, num_samples=64)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=16, sampler=s))
    assert len(batches) == 4 and torch.cat([b[0] for b in batches]).tolist() == list(s)


# --- k per class -----------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["uniform", "instance"])
def test_k_per_class_structure(labels, weighting):
    s = KPerClassBatchSampler(labels, batch_size=12, k=4, class_weighting=weighting, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == len(labels) // 12
    for batch in batches:
        assert len(batch) == 12
        classes = labels[batch]
        assert len(set(classes.tolist())) == 3
        assert all(np.sum(classes == c) == 4 for c in set(classes.tolist()))
        # Every class has >= 4 images, so no image repeats within a batch.
        assert len(set(batch)) == 12


def test_k_per_class_small_class_and_weighting():
    labels = np.repeat(np.arange(3), [100, 100, 2])
    s = KPerClassBatchSampler(labels, batch_size=6, k=3, num_samples=6000, seed=0)
    with_small = [b for b in s if 2 in labels[b].tolist()]
    assert with_small  # uniform over classes: class 2 appears in ~2/3 of batches
    for b in with_small:
        picked = [i for i in b if labels[i] == 2]
        assert len(picked) == 3 and set(picked) <= {200, 201}
    inst = KPerClassBatchSampler(labels, 4, 2, num_samples=4000, class_weighting="instance")
    small = sum(2 in labels[b].tolist() for b in inst)
    assert small < len(with_small) / 2  # size-weighted picks favour the big classes


def test_k_per_class_determinism(labels):
    kw = {"batch_size": 8, "k": 2, "seed": 5}
    a = KPerClassBatchSampler(labels, **kw)
    first = list(a)
    assert first == list(KPerClassBatchSampler(labels, **kw))
    a.set_epoch(2)
    assert list(a) != first


def test_k_per_class_errors(labels):
    with pytest.raises(ValueError, match="multiple of k"):
        KPerClassBatchSampler(labels, batch_size=10, k=4)
    with pytest.raises(ValueError, match="only 4 classes"):
        KPerClassBatchSampler(labels, batch_size=10, k=2)
    with pytest.raises(ValueError, match="class_weighting"):
        KPerClassBatchSampler(labels, batch_size=8, k=2, class_weighting="sqrt")
