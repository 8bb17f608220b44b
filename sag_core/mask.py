"""The SAG mask and the masked blur of the predicted x0.

Tokens are the layer's ``[b, c, h, w]`` activation flattened row-major (ComfyUI's SpatialTransformer
does ``x.movedim(1, 3).flatten(1, 2)``, diffusers' Transformer2DModel the same), so token
``row * w + col`` is pixel ``(row, col)`` of the ``h x w`` grid. The grid is the caller's
(``extra_options["activations_shape"][-2:]`` in ComfyUI); it is never guessed from the token count.
"""
import torch
import torch.nn.functional as F

from .blur import gaussian_blur_2d

# A key is marked when its mass exceeds the threshold: the paper's, diffusers' and the host's plain
# ``>`` (tolerance 0, the default). A flat map has masses of 1.0 up to float32 summation noise (~1e-6
# for thousands of tokens), so at threshold 1.0 it marks arbitrary tokens, as those implementations
# do; a tolerance such as this one leaves such a map unmarked. The default stays 0 because a real key
# mass of 1.00007 is above average attention and the paper blurs it.
MASS_TOLERANCE = 1e-4


def sag_mask(key_mass, grid_hw, threshold=1.0, tolerance=0.0):
    """Binary mask ``[b, 1, h, w]`` (key_mass's float dtype) of the keys with ``mass > threshold + tolerance``.

    ``key_mass`` is ``[b, h * w]`` from ``key_attention_mass``; 1.0 is the average mass, so the default
    marks the tokens that receive more than average attention (diffusers and ComfyUI use 1.0).
    """
    height, width = grid_hw
    if key_mass.ndim != 2 or key_mass.shape[1] != height * width:
        raise ValueError(
            f"key_mass must have shape [batch, {height * width}] for the {height}x{width} token grid "
            f"(got {tuple(key_mass.shape)}); pass the grid of the layer the attention came from."
        )
    mask = key_mass > threshold + tolerance
    dtype = key_mass.dtype if key_mass.is_floating_point() else torch.float32
    return mask.reshape(-1, 1, height, width).to(dtype)


def upsample_mask(mask, latent_hw):
    """Nearest-neighbour resize of a ``[b, 1, h, w]`` mask to the latent's ``(H, W)`` (or a ``[b, 1, t, h, w]`` one
    to ``(T, H, W)``), F.interpolate's default mode."""
    return F.interpolate(mask, size=tuple(int(s) for s in latent_hw), mode="nearest")


def blur_under_mask(x0, mask, kernel_size=9, sigma=1.0):
    """``blur(x0) * mask + x0 * (1 - mask)``, with a ``[b, 1, H, W]`` mask broadcast over channels."""
    if x0.ndim != 4:
        raise ValueError(f"x0 must be a [batch, channels, H, W] latent (got shape {tuple(x0.shape)}).")
    batch_ok = mask.ndim == 4 and mask.shape[0] in (1, x0.shape[0])
    if not batch_ok or mask.shape[1] != 1 or mask.shape[-2:] != x0.shape[-2:]:
        raise ValueError(
            f"mask must have shape [{x0.shape[0]} or 1, 1, {x0.shape[-2]}, {x0.shape[-1]}] to match x0 "
            f"(got {tuple(mask.shape)}); resize it with upsample_mask(mask, x0.shape[-2:])."
        )
    mask = mask.to(dtype=x0.dtype, device=x0.device)
    return gaussian_blur_2d(x0, kernel_size, sigma) * mask + x0 * (1 - mask)
