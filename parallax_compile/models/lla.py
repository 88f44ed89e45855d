"""A small byte-level causal LM whose attention layers are Local Linear Attention (LLA).

LLA (arXiv 2510.01450; SPEC section 2) replaces softmax attention's weighted mean by a weighted
ridge regression of ``v`` on ``k - q_i`` with an unpenalised intercept, evaluated at the query.
This model writes it the ways people write it, so ``parallax-compile`` can be tested on each
(README, "Local Linear Attention", catalogue of LLA forms). The solve
``rho_i = (C_kk,i + lambda I)^-1 (mu_k,i - q_i)`` (``LLAConfig.solver``):

* ``"solve"``: ``torch.linalg.solve`` (textbook normal equations); ``"solve_ex"``: ``linalg.solve_ex``;
* ``"cholesky"``: ``torch.cholesky_solve(b, torch.linalg.cholesky(A))`` (numerically careful code);
* ``"triangular"``: Cholesky then two ``torch.linalg.solve_triangular`` calls;
* ``"inv"``: ``torch.linalg.inv(A) @ b``; ``"lu"``: ``torch.linalg.lu_factor`` + ``lu_solve``;
* ``"cg"``: a conjugate-gradient loop with a fixed number of iterations (as FlashLLA does);
  ``"jacobi"`` / ``"richardson"`` (step ``omega``): fixed-iteration stationary loops from ``x = 0``.
  All three are unrolled by ``torch.export``;
* ``"lstsq"``: ``torch.linalg.lstsq(A, b)`` (``torch.export`` cannot capture it: no meta kernel).

The key statistics (``LLAConfig.moments``): ``"flatten"`` (``s @ (k k^T).flatten``), ``"einsum"``
(``einsum("bhij,bhjd,bhje->bhide", s, k, k)``, and ``C_vk`` the same way), ``"outer"`` (outer
products summed over keys) or ``"centred"`` (``(k_j - mu_k,i)`` and ``(v_j - mu_v,i)`` per query).
All output the intercept ``o_i = mu_v,i - C_vk,i rho_i`` (SPEC section 2). Causal (``causal=False``:
every key), GQA (``n_kv_head < n_head``, keys/values shared with ``repeat_interleave``), learned
positions, tied embeddings, random weights from ``seed``. Per-query ``D x D`` matrices are
materialised: keep ``head_dim`` small (the point of Parallax is to avoid exactly this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["LLA_MOMENTS", "LLA_SOLVERS", "LLAConfig", "LLAModel", "build_lla_model", "lla_core", "load_lla"]

LLA_SOLVERS = {"lla": "solve", "lla-cg": "cg"}
"""Built-in model specs -> ``LLAConfig.solver``."""
SOLVERS = ("solve", "solve_ex", "cholesky", "triangular", "inv", "lu", "cg", "jacobi", "richardson", "lstsq")
LLA_MOMENTS = ("flatten", "einsum", "outer", "centred")


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
    """How the ridge system is solved: one of ``SOLVERS`` (module docstring)."""
    cg_iters: int = 8
    """Iterations of the ``cg`` / ``jacobi`` / ``richardson`` loops."""
    omega: float = 0.3
    """Step of the ``richardson`` loop ``x <- x + omega (b - A x)``."""
    moments: str = "flatten"
    """How the weighted key (and value-key) statistics are written: one of ``LLA_MOMENTS``."""
    causal: bool = True


def _solve(a: Tensor, b: Tensor, solver: str) -> Tensor:
    """``a [..., D, D]^-1 b [..., D, 1]`` written the ``solver`` way (direct solvers only)."""
    if solver == "solve":
        return torch.linalg.solve(a, b)
    if solver == "solve_ex":
        return torch.linalg.solve_ex(a, b).result
    if solver == "cholesky":
        return torch.cholesky_solve(b, torch.linalg.cholesky(a))
    if solver == "triangular":
        low = torch.linalg.cholesky(a)
        y = torch.linalg.solve_triangular(low, b, upper=False)
        return torch.linalg.solve_triangular(low.mT, y, upper=True)
    if solver == "inv":
        return torch.linalg.inv(a) @ b
    if solver == "lu":
        lu, pivots = torch.linalg.lu_factor(a)
        return torch.linalg.lu_solve(lu, pivots, b)
    if solver == "lstsq":
        return torch.linalg.lstsq(a, b).solution
    raise ValueError(f"lla_core: solver must be one of {SOLVERS}, got {solver!r}")


def _iterate(c_kk: Tensor, b: Tensor, *, ridge: float, solver: str, iters: int, omega: float) -> Tensor:
    """``iters`` steps of CG (FlashLLA's matvec ``C p + lambda p``), Jacobi or Richardson from 0."""
    x = torch.zeros_like(b)
    if solver == "cg":
        res, p = b, b
        rs = (res * res).sum(-1, keepdim=True)
        for _ in range(iters):
            ap = (c_kk @ p.unsqueeze(-1)).squeeze(-1) + ridge * p
            alpha = rs / (p * ap).sum(-1, keepdim=True).clamp_min(1e-30)
            x = x + alpha * p
            res = res - alpha * ap
            rs_new = (res * res).sum(-1, keepdim=True)
            p = res + (rs_new / rs.clamp_min(1e-30)) * p
            rs = rs_new
        return x
    a = c_kk + ridge * torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
    diag = a.diagonal(dim1=-2, dim2=-1) if solver == "jacobi" else None
    for _ in range(iters):
        res = b - (a @ x.unsqueeze(-1)).squeeze(-1)
        x = x + (res / diag if diag is not None else omega * res)
    return x


def lla_core(q: Tensor, k: Tensor, v: Tensor, *, ridge: float, solver: str = "solve", cg_iters: int = 8,
             keep: Tensor | None = None, moments: str = "flatten", omega: float = 0.3) -> Tensor:
    """LLA as a model writes it: ``q [B, H, L, D]``, ``k``/``v`` already repeated to ``H`` heads,
    ``keep`` a bool ``[L, L]`` mask (True = allowed; None = every key). Scale ``D ** -0.5``.
    ``solver`` / ``moments`` / ``cg_iters`` / ``omega``: see :class:`LLAConfig`. Returns ``[B, H, L, Dv]``.
    Raises ``ValueError`` for an unknown ``solver`` or ``moments``.

    The float64 oracle is :func:`parallax_compile.reference.lla_attention_ref`; this function is the
    *pattern* that the passes recognise, kept in plain tensor ops.
    """
    if solver not in SOLVERS:
        raise ValueError(f"lla_core: solver must be one of {SOLVERS}, got {solver!r}")
    if moments not in LLA_MOMENTS:
        raise ValueError(f"lla_core: moments must be one of {LLA_MOMENTS}, got {moments!r}")
    d = q.shape[-1]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
    if keep is not None:
        att = att.masked_fill(~keep, float("-inf"))
    s = F.softmax(att, dim=-1)
    mu_k, mu_v = s @ k, s @ v
    outer_mu = mu_k.unsqueeze(-1) * mu_k.unsqueeze(-2)
    if moments == "flatten":
        kk = (k.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2)  # [B, H, L, D*D]
        c_kk = (s @ kk).unflatten(-1, (d, d)) - outer_mu  # [B, H, L, D, D]
    elif moments == "einsum":
        c_kk = torch.einsum("bhij,bhjd,bhje->bhide", s, k, k) - outer_mu
    elif moments == "outer":
        kk = k.unsqueeze(-1) * k.unsqueeze(-2)  # [B, H, L, D, D]
        c_kk = (s[..., None, None] * kk.unsqueeze(2)).sum(3) - outer_mu
    else:  # centred: sum_j s_ij (k_j - mu_k,i)(k_j - mu_k,i)^T
        kc = k.unsqueeze(2) - mu_k.unsqueeze(3)  # [B, H, Lq, Lk, D]
        c_kk = torch.einsum("bhij,bhijd,bhije->bhide", s, kc, kc)
    b = mu_k - q
    if solver in ("cg", "jacobi", "richardson"):
        rho = _iterate(c_kk, b, ridge=ridge, solver=solver, iters=cg_iters, omega=omega)
    else:
        eye = torch.eye(d, dtype=q.dtype, device=q.device)
        rho = _solve(c_kk + ridge * eye, b.unsqueeze(-1), solver).squeeze(-1)
    if moments == "einsum":
        c_vk = torch.einsum("bhij,bhjd,bhje->bhide", s, v, k) - mu_v.unsqueeze(-1) * mu_k.unsqueeze(-2)
        return mu_v - (c_vk @ rho.unsqueeze(-1)).squeeze(-1)
    if moments == "centred":
        vc = v.unsqueeze(2) - mu_v.unsqueeze(3)
        c_vk = torch.einsum("bhij,bhijd,bhije->bhide", s, vc, kc)
        return mu_v - (c_vk @ rho.unsqueeze(-1)).squeeze(-1)
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
        y = lla_core(q, k, v, ridge=c.ridge, solver=c.solver, cg_iters=c.cg_iters, omega=c.omega,
                     moments=c.moments, keep=self.tril[:t, :t] if c.causal else None)
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
                     f"random weights, example input: real text [{batch_size}, {seq_len}]"),
    )
