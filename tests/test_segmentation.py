"""From probabilities to masks and cells: the threshold is strict, cells are 4-connected components."""
import numpy as np
import pytest
from skimage.measure import label

from ronneberger2015.segmentation import label_cells, mask


def test_mask_is_strict_and_255():
    probabilities = np.array([[0.2, 0.5, 0.51], [0.9, 0.0, 1.0]])
    np.testing.assert_array_equal(mask(probabilities), [[0, 0, 255], [255, 0, 255]])
    assert mask(probabilities).dtype == np.uint8


def test_cells_are_the_4_connected_components_like_skimage():
    rng = np.random.default_rng(0)
    probabilities = rng.random((3, 40, 50))
    cells = label_cells(probabilities, 0.6)
    assert cells.dtype == np.uint16 and cells.shape == probabilities.shape
    for got, p in zip(cells, probabilities):  # each slice numbered on its own
        np.testing.assert_array_equal(got, label(p > 0.6, connectivity=1))
    diagonal = np.array([[0.9, 0.0], [0.0, 0.9]])
    assert label_cells(diagonal).max() == 2  # touching only at a corner: two cells


def test_min_size_drops_small_cells_and_renumbers():
    rng = np.random.default_rng(1)
    probabilities = rng.random((60, 60))
    cells = label_cells(probabilities, 0.5, min_size=4)
    components = label(probabilities > 0.5, connectivity=1)
    sizes = np.bincount(components.ravel())
    reference = label(np.isin(components, np.flatnonzero(sizes >= 4)) & (components > 0), connectivity=1)
    np.testing.assert_array_equal(cells, reference)
    assert set(np.unique(cells)) == set(range(cells.max() + 1))


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 1.0}, r"threshold must lie in \[0, 1\)"),
    ({"min_size": -1}, "min_size must be a whole number"),
    ({"min_size": 2.5}, "min_size must be a whole number"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        label_cells(np.zeros((4, 4)), **kwargs)
    with pytest.raises(ValueError, match="expected an"):
        mask(np.zeros(4))
