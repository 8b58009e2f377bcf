"""dataset.py: the hold-out split (the cache and loader are exercised in test_robustness.py and test_train.py)."""
import pytest

import dataset


def test_holdout_split_is_the_last_sorted_files():
    files = [("d/b.png", 0), ("d/c.png", 1), ("d/a.png", 0), ("d/e.png", 1), ("d/d.png", 0)]
    train, held = dataset.holdout_split(files, 2)
    assert held == [("d/d.png", 0), ("d/e.png", 1)]
    assert train == [("d/b.png", 0), ("d/c.png", 1), ("d/a.png", 0)]  # order kept
    assert dataset.holdout_split([f for f, _ in files], 0) == ([f for f, _ in files], [])
    with pytest.raises(dataset.DataError, match="holdout"):
        dataset.holdout_split(files, 5)
