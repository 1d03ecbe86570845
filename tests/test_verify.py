"""The residual identity output == act(shortcut + scale * branch), checked on tensors (spp.verify)."""

from __future__ import annotations

import torch

from spp.verify import check_residual


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_a_per_channel_scale_is_fitted():
    s, b = randn(2, 4, 5, 5), randn(2, 4, 5, 5, seed=1)
    gamma = torch.tensor([0.1, 2.0, -0.5, 1e-3]).view(1, 4, 1, 1)
    result = check_residual(s + gamma * b, s, b, output_axis=1, branch_axis=1)
    assert result.ok and "per-channel scale" in result.detail


def test_the_scale_shows_on_the_right_axis_only():
    """A per-channel scale on axis 1 does not fit when the channels are taken on axis 2 (a wrong axis)."""
    s, b = randn(2, 4, 6), randn(2, 4, 6, seed=1)
    gamma = torch.tensor([0.5, 1.0, 2.0, 3.0]).view(1, 4, 1)
    assert check_residual(s + gamma * b, s, b, output_axis=1, branch_axis=1).ok
    assert not check_residual(s + gamma * b, s, b, output_axis=2, branch_axis=2).ok


def test_a_neighbouring_tensor_is_not_the_branch():
    s, b, other = randn(2, 4, 5, 5), randn(2, 4, 5, 5, seed=1), randn(2, 4, 5, 5, seed=2)
    result = check_residual(s + b, s, other, output_axis=1, branch_axis=1)
    assert not result.ok and "not a per-channel multiple" in result.detail


def test_a_branch_read_in_window_order_matches_after_sorting():
    """Swin reads its attention branch in window order: (B * windows, positions, C), a permutation of (B, H, W, C)."""
    b = randn(1, 4, 4, 3, seed=1)
    s = randn(1, 4, 4, 3)
    windows = b.view(1, 2, 2, 2, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(4, 4, 3)  # 2x2 windows
    result = check_residual(s + 0.5 * b, s, windows, output_axis=3, branch_axis=2)
    assert result.ok and result.detail.startswith("permuted")


def test_a_padded_branch_is_refused():
    s, b = randn(1, 3, 3, 2), randn(1, 4, 4, 2, seed=1)
    result = check_residual(s + b[:, :3, :3], s, b, output_axis=3, branch_axis=3)
    assert not result.ok and "padding or cropping" in result.detail


def test_relu_after_the_addition_including_dead_channels():
    s, b = randn(2, 3, 4, 4), randn(2, 3, 4, 4, seed=1)
    b[:, 1] = -10.0 - s[:, 1].abs()  # channel 1: relu(s + b) is 0 everywhere, so its scale is only bounded
    out = torch.relu(s + b)
    assert check_residual(out, s, b, output_axis=1, branch_axis=1, post_activation="relu").ok
    assert not check_residual(out + 0.1, s, b, output_axis=1, branch_axis=1, post_activation="relu").ok
    shifted = torch.relu(s + b.roll(1, dims=3))  # the branch one position off: not relu(s + c b) for any c
    assert not check_residual(shifted, s, b, output_axis=1, branch_axis=1, post_activation="relu").ok
    assert check_residual(torch.relu(s - b), s, b, output_axis=1, branch_axis=1, post_activation="relu").ok  # c = -1


def test_rounding_of_a_tiny_branch_is_tolerated_in_float32_only():
    """Layer scale 1e-6: output - shortcut is mostly float32 rounding of the output; the check allows rounding at
    the forward's precision, not more."""
    s, b = randn(2, 8, 16), randn(2, 8, 16, seed=1)
    out = (s + 1e-6 * b).float()
    assert check_residual(out, s, b, output_axis=1, branch_axis=1, compute_dtype=torch.float32).ok
    assert not check_residual(out + 1e-3, s, b, output_axis=1, branch_axis=1, compute_dtype=torch.float32).ok
