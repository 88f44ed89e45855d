"""A small byte-level causal LM whose attention layers are Local Linear Attention (LLA).

LLA (arXiv 2510.01450; SPEC section 2) replaces softmax attention's weighted mean by a weighted
ridge regression of ``v`` on ``k - q_i`` with an unpenalised intercept, evaluated at the query.
This model writes it the two ways people write it, so ``parallax-compile`` can find it:

* ``solver="solve"``: per query ``rho_i = torch.linalg.solve(C_kk,i + lambda I, mu_k,i - q_i)``;
* ``solver="cg"``: the same system by a conjugate-gradient loop with a fixed number of
  iterations (as FlashLLA does), unrolled by ``torch.export``.

Both then output the intercept ``o_i = mu_v,i - C_vk,i rho_i`` (SPEC section 2). Causal, GQA
(``n_kv_head < n_head``, keys/values shared with ``repeat_interleave``), learned positions, tied
embeddings, random weights from ``seed``. Per-query ``D x D`` matrices are materialised: keep
``head_dim`` small (the point of Parallax is to avoid exactly this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["LLA_SOLVERS", "LLAConfig", "LLAModel", "build_lla_model", "lla_core", "load_lla"]

LLA_SOLVERS = {"lla": "solve", "lla-cg": "cg"}
"""Built-in model specs -> ``LLAConfig.solver``."""


@dataclass
class LLAConfig:
    block_size: int = 256
    vocab_size: int = 256  # UTF-8 bytes
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 16
    n_embd: int = 64
    ridge: float = 0.5
    """``lambda`` of the ridge (a plain number: the passes read it from the graph)."""
    solver: str = "solve"
    """``"solve"`` (``torch.linalg.solve``) or ``"cg"`` (fixed-iteration conjugate gradient)."""
    cg_iters: int = 8


def lla_core(q: Tensor, k: Tensor, v: Tensor, *, ridge: float, solver: str = "solve", cg_iters: int = 8,
             keep: Tensor | None = None) -> Tensor:
    """LLA as a model writes it: ``q [B, H, L, D]``, ``k``/``v`` already repeated to ``H`` heads,
    ``keep`` a bool ``[L, L]`` mask (True = allowed). Scale ``D ** -0.5``. Returns ``[B, H, L, Dv]``.

    The float64 oracle is :func:`parallax_compile.reference.lla_attention_ref`; this function is the
    *pattern* (solve or CG) that the passes recognise, kept in plain tensor ops.
    """
    d = q.shape[-1]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
    if keep is not None:
        att = att.masked_fill(~keep, float("-inf"))
    s = F.softmax(att, dim=-1)
    mu_k, mu_v = s @ k, s @ v
    kk = (k.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2)  # [B, H, L, D*D]
    c_kk = (s @ kk).unflatten(-1, (d, d)) - mu_k.unsqueeze(-1) * mu_k.unsqueeze(-2)  # [B, H, L, D, D]
    b = mu_k - q
    if solver == "solve":
        eye = torch.eye(d, dtype=q.dtype, device=q.device)
        rho = torch.linalg.solve(c_kk + ridge * eye, b.unsqueeze(-1)).squeeze(-1)
    elif solver == "cg":
        # (C_kk + lambda I) x = b by CG from x = 0; the matrix-vector product is written FlashLLA's
        # way, ``C p + lambda p``, without forming C + lambda I.
        x = torch.zeros_like(b)
        res, p = b, b
        rs = (res * res).sum(-1, keepdim=True)
        for _ in range(cg_iters):
            ap = (c_kk @ p.unsqueeze(-1)).squeeze(-1) + ridge * p
            alpha = rs / (p * ap).sum(-1, keepdim=True).clamp_min(1e-30)
            x = x + alpha * p
            res = res - alpha * ap
            rs_new = (res * res).sum(-1, keepdim=True)
            p = res + (rs_new / rs.clamp_min(1e-30)) * p
            rs = rs_new
        rho = x
    else:
        raise ValueError(f"lla_core: solver must be 'solve' or 'cg', got {solver!r}")
    # Intercept of the local linear fit: mu_v - C_vk rho, C_vk rho = sum_j s_ij (v_j - mu_v)((k_j - mu_k) . rho)
    g = rho @ k.transpose(-2, -1) - (mu_k * rho).sum(-1, keepdim=True)
    w = s * g
    return mu_v - (w @ v - mu_v * w.sum(-1, keepdim=True))


class LLAAttention(nn.Module):
    def __init__(self, c: LLAConfig):
        super().__init__()
        if c.n_head % c.n_kv_head:
            raise ValueError(f"LLAConfig: n_head={c.n_head} must be a multiple of n_kv_head={c.n_kv_head}")
        self.c = c
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(c.block_size, c.block_size, dtype=torch.bool)),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        c = self.c
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.n_head, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        rep = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = lla_core(q, k, v, ridge=c.ridge, solver=c.solver, cg_iters=c.cg_iters, keep=self.tril[:t, :t])
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c.n_head * c.head_dim))


class Block(nn.Module):
    def __init__(self, c: LLAConfig):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.attn = LLAAttention(c)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(), nn.Linear(4 * c.n_embd, c.n_embd))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LLAModel(nn.Module):
    """``forward(idx [B, T] int64) -> logits [B, T, vocab]`` (every position)."""

    def __init__(self, c: LLAConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build_lla_model(solver: str = "solve", *, seed: int = 0, **overrides) -> LLAModel:
    """The example LLA LM in eval mode with random weights (``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    model = LLAModel(LLAConfig(solver=solver, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02 if "wte" in name or "wpe" in name else (1.0 / p.shape[1]) ** 0.5)
    return model.eval()


def load_lla(solver: str = "solve", *, seq_len: int = 64, batch_size: int = 2, spec: str = "lla"):
    """The built-in ``lla`` / ``lla-cg`` specs: :func:`build_lla_model` plus real text ``[B, T]``."""
    from .loaded import LoadedModel
    from .text import byte_tokens

    model = build_lla_model(solver)
    c = model.config
    if not 1 <= seq_len <= c.block_size:
        raise ValueError(f"{spec}: seq_len must be in [1, {c.block_size}], got {seq_len}")
    how = "torch.linalg.solve" if solver == "solve" else f"a {c.cg_iters}-step conjugate-gradient loop"
    return LoadedModel(
        spec=spec,
        model=model,
        example_inputs={"idx": byte_tokens(seq_len, batch_size=batch_size)},
        dynamic_dims={"idx": {0: "batch", 1: "seq"}},
        valid_positions=None,
        description=(f"byte-level causal LM with Local Linear Attention ({c.n_layer} layers, {c.n_head} heads / "
                     f"{c.n_kv_head} KV heads, head_dim {c.head_dim}, lambda={c.ridge:g}, solved with {how}), "
                     f"random weights, real text [{batch_size}, {seq_len}]"),
    )
