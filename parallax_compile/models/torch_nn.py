"""Toy ``torch.nn`` attention modules shared by the tests and the benchmarks."""

from __future__ import annotations

from torch import Tensor, nn


class CrossMha(nn.Module):
    """Cross-attention with ``nn.MultiheadAttention(64, 4, batch_first=True)``: ``x`` [B, Lq, 64]
    attends to ``memory`` [B, Lk, 64] (``Lq != Lk`` allowed); returns [B, Lq, 64] (float32).
    Its query projection is a slice of the fused ``in_proj_weight`` (``in_proj_weight[:64]``)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        return self.attn(x, memory, memory, need_weights=False)[0]
