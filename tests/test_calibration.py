"""The calibration metrics and the rotated-image shift of the Laplace benchmark."""

import math

import pytest
import torch

from hesscale.experiments.calibration import calibration_metrics, reliability, rotate


def test_metrics_by_their_definitions():
    probs = torch.tensor([[0.95, 0.05], [0.15, 0.85], [0.65, 0.35], [0.25, 0.75]])
    labels = torch.tensor([0, 1, 1, 1])
    m = calibration_metrics(probs, labels, bins=10)
    assert m["accuracy"] == pytest.approx(0.75)
    nll = -(math.log(0.95) + math.log(0.85) + math.log(0.35) + math.log(0.75)) / 4
    assert m["nll"] == pytest.approx(nll, rel=1e-6)
    assert m["brier"] == pytest.approx((0.005 + 0.045 + 0.845 + 0.125) / 4, rel=1e-6)
    # one example per bin (0.95, 0.85, 0.65 wrong, 0.75): |acc - conf| averaged
    assert m["ece"] == pytest.approx((0.05 + 0.15 + 0.65 + 0.25) / 4, rel=1e-6)


def test_a_calibrated_predictor_has_a_small_ece_and_an_overconfident_one_a_large():
    g = torch.Generator().manual_seed(0)
    n = 20000
    confidence = torch.rand(n, generator=g) * 0.5 + 0.5
    labels = (torch.rand(n, generator=g) > confidence).long()  # class 0 with prob. confidence
    probs = torch.stack([confidence, 1 - confidence], 1)
    assert calibration_metrics(probs, labels)["ece"] < 0.02
    sharp = torch.stack([torch.full((n,), 0.99), torch.full((n,), 0.01)], 1)
    assert calibration_metrics(sharp, labels)["ece"] > 0.2
    confidence_per_bin, accuracy_per_bin, count = reliability(probs, labels, bins=10)
    assert count.sum() == n and torch.isnan(accuracy_per_bin[:5]).all()  # no confidence < 0.5


def test_rotation_turns_images_about_their_centre():
    x = torch.arange(2 * 3 * 16.0).view(2, 1, 4, 12)[..., :4].contiguous().double()
    assert torch.equal(rotate(x, 0), x)
    torch.testing.assert_close(rotate(x, 90), torch.rot90(x, 1, (2, 3)))
    torch.testing.assert_close(rotate(x, 180), torch.rot90(x, 2, (2, 3)))
    assert rotate(x, 45).shape == x.shape


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        calibration_metrics(torch.rand(3), torch.tensor([0, 1, 0]))
