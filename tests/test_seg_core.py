"""seg_core: SEG's query blur against a direct computation (the blur as an explicit linear operator on each
axis of the token grid, support.seg_reference.direct_query_blur) and against the reference pipeline's own
2-D blur on square grids."""
import math

import pytest
import torch

from attention_guidance.seg_core import (
    INFINITE_BLUR_SIGMA, blur_queries, grid_kernel_size, seg_kernel_size, validate_seg_inputs,
)
from support.seg_reference import direct_query_blur as direct_blur, reference_query_blur


def test_kernel_size_is_ceil_6_sigma_plus_one_made_odd_and_fits_the_grid():
    assert [seg_kernel_size(s) for s in (0.2, 0.5, 1.0, 1.1, 1.2, 2.0, 100.0)] == [3, 3, 7, 7, 9, 13, 601]
    # the reference's clamp: the side if odd, side + 1 if even (reflect padding of k // 2 < side)
    assert [grid_kernel_size(601, side) for side in (1, 2, 3, 4, 7, 8)] == [1, 3, 3, 5, 7, 9]
    assert grid_kernel_size(7, 64) == 7


@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (3, 10), (1, 6), (6, 1)])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 100.0])
@pytest.mark.parametrize("frames", [1, 3])
def test_blur_is_the_direct_gaussian_on_each_frames_grid(grid, sigma, frames):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, frames * grid[0] * grid[1], 6, generator=generator)
    out = blur_queries(queries, grid, sigma, frames)
    expected = direct_blur(queries, grid, sigma, frames)
    assert out.shape == queries.shape and out.dtype == queries.dtype
    assert torch.allclose(out.double(), expected, atol=1e-5)
    if grid[0] > 1 or grid[1] > 1:
        assert not torch.allclose(out, queries, atol=1e-3)


@pytest.mark.parametrize("side", [2, 4, 7, 8, 9])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 100.0])
def test_square_grids_get_the_reference_pipelines_blur(side, sigma):
    generator = torch.Generator().manual_seed(1)
    maps = torch.randn(2, 5, side, side, generator=generator)  # [n, channels, h, w], the reference's layout
    tokens = maps.flatten(2).transpose(1, 2)  # [n, h * w, channels]
    ours = blur_queries(tokens, (side, side), sigma).transpose(1, 2).reshape(maps.shape)
    assert torch.allclose(ours, reference_query_blur(maps, sigma), atol=1e-5)


def test_the_heads_layout_is_blurred_like_the_flat_layout():
    generator = torch.Generator().manual_seed(2)
    flat = torch.randn(2, 2 * 4 * 6, 3 * 5, generator=generator)  # [B, L, heads * D]
    heads = flat.reshape(2, -1, 3, 5).transpose(1, 2)  # [B, heads, L, D]
    out_flat = blur_queries(flat, (4, 6), 1.5, frames=2)
    out_heads = blur_queries(heads, (4, 6), 1.5, frames=2)
    assert torch.allclose(out_heads.transpose(1, 2).reshape(flat.shape), out_flat, atol=1e-6)


@pytest.mark.parametrize("sigma", [INFINITE_BLUR_SIGMA, 10000.0, 9999999.0, math.inf])
def test_infinite_blur_gives_every_query_its_frames_mean(sigma):
    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(2, 2 * 5 * 7, 4, generator=generator)
    out = blur_queries(queries, (5, 7), sigma, frames=2)
    means = queries.reshape(2, 2, 35, 4).mean(dim=2, keepdim=True)
    assert torch.allclose(out, means.expand(2, 2, 35, 4).reshape(queries.shape), atol=1e-6)
    # just below the threshold it is still a (clamped, almost flat) finite blur, not the mean
    finite = blur_queries(queries, (5, 7), 9998.0, frames=2)
    assert torch.allclose(finite.double(), direct_blur(queries, (5, 7), 9998.0, 2), atol=1e-5)
    assert not torch.allclose(finite, out, atol=1e-3)


def test_half_precision_is_blurred_in_float32():
    generator = torch.Generator().manual_seed(4)
    queries = torch.randn(1, 6 * 6, 8, generator=generator)
    out = blur_queries(queries.half(), (6, 6), 1.0)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), blur_queries(queries, (6, 6), 1.0), atol=2e-3)


def test_a_grid_that_does_not_fit_the_tokens_is_an_error():
    with pytest.raises(ValueError, match=r"35 image queries do not fill 1 frame\(s\) of the 6x6 token grid"):
        blur_queries(torch.zeros(1, 35, 4), (6, 6), 1.0)


@pytest.mark.parametrize("scale, blur_sigma, message", [
    (-1.0, 1.0, r"SEG scale is -1.0; it must be a number from 0.0 to 100.0"),
    (math.nan, 1.0, r"SEG scale is nan"),
    (3.0, math.nan, r"SEG blur_sigma is nan; it must be a number"),
    (3.0, 0.1, r"SEG blur_sigma is 0.1: its Gaussian kernel .* has one tap"),
    (3.0, 0.0, r"SEG blur_sigma is 0.0: its Gaussian kernel"),
    (3.0, -2.0, r"SEG blur_sigma is -2.0; it must be a number >= 0"),
])
def test_inputs_that_would_do_nothing_or_cannot_be_read_are_refused(scale, blur_sigma, message):
    with pytest.raises(ValueError, match=message):
        validate_seg_inputs(scale, blur_sigma)
    validate_seg_inputs(3.0, 0.2)
    validate_seg_inputs(3.0, 1e7)


@pytest.mark.parametrize("sigma", [1.0, 3.0, 9999999.0])
def test_diffusers_hook_blur_agrees_only_with_its_branches_routed_the_right_way(sigma):
    # diffusers' hook (0.42.1) takes its blur branch when sigma > threshold and the mean branch otherwise;
    # routed by hand (threshold -inf for a finite sigma, +inf for the infinite one) it is our blur on a square
    # grid, as its own routing it swaps them
    from diffusers.hooks.smoothed_energy_guidance_utils import _gaussian_blur_2d

    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(2, 8 * 8, 6, generator=generator)
    ours = blur_queries(queries, (8, 8), sigma)
    infinite = sigma >= INFINITE_BLUR_SIGMA
    routed = _gaussian_blur_2d(queries.clone(), seg_kernel_size(sigma), sigma, math.inf if infinite else -math.inf)
    assert torch.allclose(routed, ours, atol=1e-5)
    as_shipped = _gaussian_blur_2d(queries.clone(), seg_kernel_size(sigma), sigma, INFINITE_BLUR_SIGMA)
    assert not torch.allclose(as_shipped, ours, atol=1e-3)
