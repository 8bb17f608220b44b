"""Token grids: where each attention token sits in the image (or video) of a layer.

A UNet layer's grid (``token_grid``):

Tokens are the layer's ``[b, c, h, w]`` activation flattened row-major (ComfyUI's SpatialTransformer
does ``x.movedim(1, 3).flatten(1, 2)``, diffusers' Transformer2DModel the same), so token
``row * w + col`` is pixel ``(row, col)`` of the ``h x w`` grid. The grid is the caller's
(``extra_options["activations_shape"][-2:]`` in ComfyUI); it is never guessed from the token count.
SAG lays its attention map on it, SEG blurs the queries on it. A DiT's grid (``patch_grid``) is the
latent's, patched.
"""


def token_grid(activations_shape, tokens=None):
    """``(h, w)`` of a layer's ``[b, c, h, w]`` activation shape, checked against ``tokens`` if given."""
    if activations_shape is None or len(activations_shape) != 4:
        raise ValueError(
            f"activations_shape must be the layer's [b, c, h, w] (got {activations_shape!r}); SAG and SEG "
            "need a spatial self-attention layer of a UNet (ComfyUI sets transformer_options['activations_shape'] there "
            "since late 2025: 0.3.75 does, 0.3.64 does not; update ComfyUI if it is missing)."
        )
    height, width = int(activations_shape[-2]), int(activations_shape[-1])
    if tokens is not None and height * width != tokens:
        raise ValueError(
            f"the attention has {tokens} tokens but activations_shape {list(activations_shape)} gives an "
            f"{height}x{width} grid ({height * width} tokens); choose a spatial self-attention layer."
        )
    return height, width


def patch_grid(latent_size, patch_size) -> tuple[int, ...]:
    """ceil(size / patch) on each axis: the latent padded to the patch size, then patched.

    ``latent_size`` is ``(H, W)`` or ``(T, H, W)``, ``patch_size`` an int for ``H`` and ``W`` or one per axis;
    the host's DiTs pad the latent to the patch size before patching."""
    patches = (patch_size,) * 2 if isinstance(patch_size, int) else tuple(patch_size)
    sizes = tuple(latent_size)[-len(patches):]
    return tuple(-(-int(size) // int(patch)) for size, patch in zip(sizes, patches))
