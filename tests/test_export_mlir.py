"""MLIR export through torch-mlir (issue 6).

* A converted tiny Llama: ``raw`` keeps each Parallax site as one ``torch.operator
  "torch.parallax.attention"``; ``linalg-on-tensors`` has no Parallax op left and its text parses
  back in a fresh MLIR context. ``torch`` and ``stablehlo`` are produced for the op alone (GQA,
  mask, window). Batch and sequence dims stay dynamic in every type.
* The decomposition the lowered types use equals the op (and the float64 reference) on random
  inputs with GQA, Lq < Lk, causal, window, bool and additive masks and an all-masked row, and
  the decomposed program of a converted tiny Llama (GQA, left padding) runs like the converted
  model at another batch and length.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torch_mlir")

from torch_mlir import ir

from parallax_compile import export_mlir
from parallax_compile.convert import relative_error, run_conversion
from parallax_compile.export.mlir import decompose_attention
from parallax_compile.export.program import program
from parallax_compile.models import load_model
from parallax_compile.reference import parallax_attention_ref


@pytest.fixture(scope="module")
def tiny_llama():
    loaded = load_model("tiny-llama")
    gm, info = run_conversion(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                              valid_positions=loaded.valid_positions)
    assert len(info.rewritten) == 2
    return loaded, gm, program(gm)  # exported once, shared by the tests


class Attention(torch.nn.Module):
    """One Parallax call with GQA (4:2), a bool mask and a window: a small graph to lower."""

    def forward(self, q, r, k, v, keep):
        return torch.ops.parallax.attention(q, r, k, v, keep, 0.3, True, 3)[0]


def _attention_program():
    g = torch.Generator().manual_seed(3)
    q, r = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(2))
    k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(2))
    keep = torch.rand(2, 1, 6, 6, generator=g) > 0.2
    b, n = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = ({0: b, 2: n},) * 4 + ({0: b, 2: n, 3: n},)
    return program(Attention(), (q, r, k, v, keep), dims)


# The converted tiny Llama for raw and linalg-on-tensors; the other lowered types on the op alone
# (each lowering of the model takes ~8 s of CPU).
@pytest.mark.parametrize("output_type,source", [("raw", "llama"), ("linalg-on-tensors", "llama"),
                                                ("torch", "op"), ("stablehlo", "op")])
def test_each_output_type(tiny_llama, output_type, source, tmp_path):
    ep = tiny_llama[2] if source == "llama" else _attention_program()
    path = tmp_path / f"model.{output_type}.mlir"
    module = export_mlir(ep, output_type=output_type, path=path)
    text = path.read_text()
    assert text == str(module) and "func.func @main" in text
    head = text[text.index("func.func @main"):].split("\n", 1)[0]
    first_arg = head.split("%arg1")[0]  # the first input: [B, L] ids or [B, H, L, D]
    assert first_arg.count("?") == 2, f"batch and sequence must stay dynamic: {head}"
    if output_type == "raw":
        assert text.count('torch.operator "torch.parallax.attention"') == 2
    else:
        assert "parallax" not in text, "lowered types must not keep the Parallax op"
    if output_type == "linalg-on-tensors":
        assert "linalg.generic" in text or "linalg.matmul" in text or "linalg.batch_matmul" in text
        with ir.Context():
            parsed = ir.Module.parse(text)
            assert parsed.operation.verify()


def test_unknown_output_type_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="output_type"):
        export_mlir(tiny_llama[2], output_type="llvm")


@pytest.mark.parametrize("causal,window,mask", [(False, None, "bool"), (True, 3, None), (True, None, "additive"),
                                                (False, 2, None)])
def test_decomposition_matches_op_and_reference(causal, window, mask):
    g = torch.Generator().manual_seed(7)
    q, r = (torch.randn(2, 6, 5, 8, generator=g) for _ in range(2))
    k, v = torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 5, 9, generator=g) > 0.4
        m[1, 0, 2] = False  # every key masked
    elif mask == "additive":
        m = torch.randn(2, 6, 5, 9, generator=g)
        m[0, :, 3] = -math.inf
    got = decompose_attention(q, r, k, v, m, 0.4, causal, window)
    want = torch.ops.parallax.attention(q, r, k, v, m, 0.4, causal, window)
    for name, a, b in zip(("out", "mu_v", "lse", "c"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        fin = torch.isfinite(b)
        assert relative_error(a[fin].double(), b[fin].double()) <= 1e-5, name
    ref = parallax_attention_ref(q.double(), r.double(), k.double(), v.double(), scale=0.4, causal=causal,
                                 window_size=window, attn_mask=m.double() if mask == "additive" else m)
    assert relative_error(got[0].double(), ref) <= 1e-5


def test_decomposed_program_runs_like_the_model(tiny_llama):
    _, gm, ep = tiny_llama
    ep = ep.run_decompositions({torch.ops.parallax.attention.default: decompose_attention})
    assert not any(n.target is torch.ops.parallax.attention.default for n in ep.graph.nodes)
    other = load_model("tiny-llama", seq_len=26, batch_size=3)  # same weights, other shapes
    with torch.no_grad():
        got = ep.module()(**other.example_inputs)
        want = gm(**other.example_inputs)
    assert relative_error(got[0], want[0], other.valid_positions) <= 1e-5
