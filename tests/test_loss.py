"""Eq. 1 against a hand-computed value."""
import math

import pytest
import torch

from ronneberger2015.loss import weighted_cross_entropy


def test_hand_computed_2x2():
    # Two classes; per pixel the scores (a_0, a_1), the true class and w(x).
    logits = torch.tensor([[[[0.0, 1.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]]])  # (1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [0, 1]]])
    weight = torch.tensor([[[1.0, 2.0], [0.5, 10.0]]])
    # p_true per pixel: e^0/(e^0+e^0), e^0/(e^1+e^0), e^2/(e^2+e^0), e^3/(e^0+e^3)
    p = [0.5, 1 / (math.e + 1), math.e**2 / (math.e**2 + 1), math.e**3 / (1 + math.e**3)]
    expected = -(1.0 * math.log(p[0]) + 2.0 * math.log(p[1]) + 0.5 * math.log(p[2]) + 10.0 * math.log(p[3])) / 4
    assert weighted_cross_entropy(logits, target, weight).item() == pytest.approx(expected, rel=1e-6)


def test_unit_weights_equal_cross_entropy():
    logits = torch.randn(2, 3, 5, 4)
    target = torch.randint(0, 3, (2, 5, 4))
    expected = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, torch.ones(2, 5, 4)), expected)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="expected logits"):
        weighted_cross_entropy(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 3, dtype=torch.long), torch.ones(1, 3, 3))
