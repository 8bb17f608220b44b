"""The host evaluates several conditionings in one forward: the batch is ``len(chunks)`` chunks of
equal size, chunk ``i`` belonging to cond list ``chunks[i]`` (the host's ``cond_or_uncond``: 0 is
the positive, 1 the negative, guidance passes add 2, 3, ...). Guidance acts on whole chunks."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def chunk_rows(chunks: Sequence[int], positions: Sequence[int], rows: int, device) -> slice | torch.Tensor:
    """An index of the rows of the chunks at ``positions`` (positions in ``chunks``, not cond ids): a
    slice where they are consecutive, else a tensor made on ``device`` (from Python numbers it would be
    a copy from the host, which waits for the device)."""
    size = rows // len(chunks)
    positions = list(positions)
    if positions == list(range(positions[0], positions[-1] + 1)):
        return slice(positions[0] * size, (positions[-1] + 1) * size)
    return torch.cat([torch.arange(p * size, (p + 1) * size, device=device) for p in positions])


def split_by_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunks: Sequence[int],
    selected: Callable[[int], bool],
    on_selected: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int]], torch.Tensor],
    on_rest: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int]], torch.Tensor],
) -> torch.Tensor:
    """Attention for a chunked batch where some chunks are handled differently.

    ``on_selected`` gets the rows of the chunks for which ``selected(cond_id)`` holds, ``on_rest``
    the others; each also gets the positions (in ``chunks``) of the rows it was given, in order.
    The outputs are put back in the original row order.
    """
    picked = [i for i, c in enumerate(chunks) if selected(c)]
    if not picked:
        return on_rest(q, k, v, list(range(len(chunks))))
    if len(picked) == len(chunks):
        return on_selected(q, k, v, picked)
    rest = [i for i in range(len(chunks)) if i not in picked]
    rows_picked = chunk_rows(chunks, picked, q.shape[0], q.device)
    rows_rest = chunk_rows(chunks, rest, q.shape[0], q.device)
    out_rest = on_rest(q[rows_rest], k[rows_rest], v[rows_rest], rest)
    out_picked = on_selected(q[rows_picked], k[rows_picked], v[rows_picked], picked)
    out = out_rest.new_empty((q.shape[0],) + tuple(out_rest.shape[1:]))
    out[rows_rest] = out_rest
    out[rows_picked] = out_picked.to(out.dtype)
    return out
