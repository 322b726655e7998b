import numpy as np
import pytest

from conftest import FMNIST_ROOT
from longtail.data.imbalance import (
    check_counts,
    class_counts,
    long_tail_indices,
    profile_counts,
)
from longtail.errors import DataError

FMNIST = FMNIST_ROOT


@pytest.mark.parametrize(
    ("n_max", "num_classes", "ratio", "total"),
    [
        (5000, 10, 100, 12406),
        (5000, 10, 50, 13996),
        (5000, 10, 10, 20431),
        (500, 100, 100, 10847),
        (500, 100, 50, 12608),
        (500, 100, 10, 19573),
        (6000, 10, 100, 14886),
    ],
)
def test_known_lt_sizes(n_max, num_classes, ratio, total):
    assert sum(profile_counts(n_max, num_classes, ratio)) == total


def test_cifar10_lt_per_class_counts():
    assert profile_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_step_profile():
    assert profile_counts(5000, 10, 100, "step") == [5000] * 5 + [50] * 5
    assert profile_counts(100, 5, 10, "step") == [100, 100, 10, 10, 10]


def test_ratio_one_is_balanced_and_single_class_ok():
    assert profile_counts(7, 4, 1) == [7, 7, 7, 7]
    assert profile_counts(7, 1, 100) == [7]


def test_bad_ratio_and_profile():
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        profile_counts(5000, 10, 0.5)
    with pytest.raises(ValueError, match="exp, step"):
        profile_counts(5000, 10, 10, "linear")


def _reference_recipe(targets, counts, seed):
    """Cao et al.'s loop, written against numpy's legacy global generator."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        kept = []
        for c, n in enumerate(counts):
            idx = np.where(targets == c)[0]
            np.random.shuffle(idx)
            kept.append(idx[:n])
        return np.concatenate(kept)
    finally:
        np.random.set_state(state)


@pytest.fixture(scope="module")
def balanced_targets():
    # 10 classes x 5000, interleaved like a real shuffled training set.
    return np.random.default_rng(1).permutation(np.repeat(np.arange(10), 5000))


@pytest.mark.parametrize("ratio", [100, 50, 10])
def test_long_tail_indices_counts(balanced_targets, ratio):
    idx = long_tail_indices(balanced_targets, ratio)
    expected = profile_counts(5000, 10, ratio)
    assert idx.dtype == np.int64
    assert len(np.unique(idx)) == len(idx)
    assert class_counts(balanced_targets[idx], 10).tolist() == expected
    # Grouped by class in label order.
    assert np.all(np.diff(balanced_targets[idx]) >= 0)


def test_long_tail_indices_matches_legacy_recipe_and_is_deterministic(balanced_targets):
    a = long_tail_indices(balanced_targets, 100, seed=0)
    ref = _reference_recipe(balanced_targets, profile_counts(5000, 10, 100), 0)
    np.testing.assert_array_equal(a, ref)
    np.testing.assert_array_equal(a, long_tail_indices(balanced_targets, 100, seed=0))
    assert not np.array_equal(a, long_tail_indices(balanced_targets, 100, seed=1))


def test_long_tail_indices_n_max_and_short_classes():
    targets = np.repeat(np.arange(3), [10, 3, 10])
    idx = long_tail_indices(targets, 2, n_max=8)
    # Counts 8, 5, 4 wanted; class 1 only has 3 images so keeps all of them.
    assert class_counts(targets[idx], 3).tolist() == [8, 3, 4]


def test_class_counts_and_check_counts():
    assert class_counts(np.array([0, 2, 2]), 4).tolist() == [1, 0, 2, 0]
    with pytest.raises(DataError, match="labels must lie in 0..1"):
        class_counts(np.array([0, 2]), 2)
    check_counts([3, 1], ["a", "b"])
    with pytest.raises(
        DataError, match=r"class 1 \('cat'\) \(and 1 more\).*lower the imbalance ratio"
    ):
        check_counts([3, 0, 0], ["dog", "cat", "cow"])


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_lt_size():
    from longtail.data.sources import read_idx

    targets = read_idx(FMNIST / "train-labels-idx1-ubyte.gz").astype(np.int64)
    idx = long_tail_indices(targets, 100)
    assert len(idx) == 14886
    assert class_counts(targets[idx], 10).tolist() == profile_counts(6000, 10, 100)
