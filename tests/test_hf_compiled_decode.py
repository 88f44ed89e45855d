"""An upgraded model's decode step compiles whole (issue 13, defect 7).

The decode step is what ``generate(..., cache_implementation="static")`` calls once per new token:
the model's forward with one token, transformers' ``StaticCache`` and the 4-D mask generate builds
for a compilable cache (``prepare_inputs_for_generation``). Here it is run as generate passes it,
by generate itself: the prefill stays eager and every one-token step goes through
``torch.compile(model.forward, fullgraph=True)`` (a graph break raises), or through transformers'
own compile path (``compile_config``; ``model.__call__`` compiled for the decode steps).

* CPU, Inductor (the default backend): a tiny Llama (GQA, RoPE) and a tiny Qwen3 (per-head q-norm)
  upgraded with ``hf.upgrade``, then random probes (random ``W_R``, gains about one). For a
  batch without padding and a left-padded one (generate's decode step gets a boolean mask over
  the whole static cache: the unwritten slots and the padding are masked), every compiled decode
  step's logits equal the eager step's and the tokens are the eager ones; one graph serves every
  step of both batches; the unconverted model compiled the same way is the control (it compiles
  as many graphs). The upgraded model's logits differ from the control's by far more
  than the tolerance, so a step that lost ``r`` or read a wrong cache slot fails.
* CUDA (``gpu``): transformers' generate path with ``mode="reduce-overhead"`` (CUDA-graph trees):
  the same comparison over several replays, no ``skipping cudagraphs`` (Inductor's
  ``cudagraph_skips`` counter stays 0, and ``cudagraph_or_error`` turns a skip into an error) and
  CUDA graphs were recorded; with the op's portable path (fp32's default on CUDA) and with the
  Triton kernel (forced).

Tolerance (fp32): eager and compiled decode steps run the same exact attention (the op with
the static cache's mask; eager takes the kvcache entry point once the cache is full and the mask
keeps every slot; on the CPU both accumulate in fp64), so they differ only by the fp32 rounding
of Inductor's fused projections, norms and rotary: measured at most 1.2e-7 on logits of size
about 0.6. ``TOL = 1e-5`` (absolute and relative) leaves 80x margin for other CPUs' vector widths
and is far below what a lost probe, a wrong mask or a wrong cache slot moves (the upgraded
logits differ from the control's by 0.65). On CUDA the attention's statistics are fp32 (not
fp64) and the last eager step runs the split-KV decode kernel: ``GPU_TOL = 1e-4``, still 1000x
an fp32 ulp of these logits and 1000x below the probes' effect.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import parallax_compile
from parallax_compile import hf
from parallax_compile.models import load_model

from graph_tools import switch_on_probes

TOL = 1e-5
GPU_TOL = 1e-4
NEW_TOKENS = 6


def _models(family):
    """(unconverted, upgraded with random probes), same weights."""
    loaded = load_model(f"tiny-{family}", seq_len=10)
    original = copy.deepcopy(loaded.model)
    info = hf.upgrade(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims,
                      valid_positions=loaded.valid_positions)
    assert len(info.rewritten) == loaded.model.config.num_hidden_layers
    switch_on_probes(loaded.model)
    return original, loaded.model


def _prompts(vocab, device="cpu"):
    """Two batches of two 9-token rows (pad id 0): no padding, and the second row left-padded to 5."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (2, 9), generator=g)
    full = torch.ones(2, 9, dtype=torch.long)
    padded = full.clone()
    padded[1, :4] = 0
    pairs = [(ids, full), (ids.masked_fill(padded == 0, 0), padded)]
    return [(i.to(device), m.to(device)) for i, m in pairs]


def _generate(model, ids, mask, **kw):
    kw = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0,
          "cache_implementation": "static", "output_logits": True, "return_dict_in_generate": True, **kw}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kw)


def _compile_decode_steps(model, **compile_kwargs):
    """Send generate's one-token steps through ``torch.compile(model.forward, fullgraph=True)`` (the
    prefill, of another length, stays eager); returns the list the compiled steps are counted in."""
    eager = model.forward
    compiled = torch.compile(eager, fullgraph=True, **compile_kwargs)
    steps = []

    @functools.wraps(eager)  # generate reads the forward's signature
    def forward(*args, **kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        if ids.shape[1] == 1:
            steps.append(ids.shape)
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    model.forward = forward
    return steps


def _assert_same_steps(got, want, tol):
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    assert len(got.logits) == len(want.logits) == NEW_TOKENS
    for i, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, i=i: f"step {i}: {m}")


def _largest_difference(outs_a, outs_b):
    return max((a - b).abs().max().item() for x, y in zip(outs_a, outs_b) for a, b in zip(x.logits, y.logits))


def _decode_compiles_like_eager(model, backend="inductor"):
    """Eager then compiled decode steps for both prompts; returns (graphs compiled, eager outputs)."""
    from torch._dynamo.utils import counters

    prompts = _prompts(model.config.vocab_size)
    want = [_generate(model, ids, mask) for ids, mask in prompts]
    torch._dynamo.reset()
    counters.clear()
    steps = _compile_decode_steps(model, backend=backend)
    got = [_generate(model, ids, mask) for ids, mask in prompts]
    assert len(steps) == 2 * (NEW_TOKENS - 1)  # every decode step ran compiled
    assert not counters["graph_break"], dict(counters["graph_break"])
    for g, w in zip(got, want):
        _assert_same_steps(g, w, TOL)
    return counters["stats"]["unique_graphs"], want


def test_upgraded_decode_step_compiles_fullgraph():
    """The default tier's guard (AOT autograd, no Inductor codegen: about 10 s on 2 cores): the whole
    upgraded Llama's decode step traces as one graph, once for every step and both prompts, and
    equals the eager step."""
    original, model = _models("llama")
    graphs, upgraded_steps = _decode_compiles_like_eager(model, backend="aot_eager")
    assert graphs == 1
    original_steps = [_generate(original, ids, mask) for ids, mask in _prompts(model.config.vocab_size)]
    assert _largest_difference(upgraded_steps, original_steps) > 100 * TOL  # the probes are live


@pytest.mark.slow  # Inductor's C++ codegen: about 70 s per model with a cold cache on 2 cores
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_upgraded_decode_step_compiles_fullgraph_inductor(family):
    original, model = _models(family)
    graphs, upgraded_steps = _decode_compiles_like_eager(model)
    control_graphs, original_steps = _decode_compiles_like_eager(original)
    assert graphs == control_graphs == 1  # compiled once for every step and both prompts, like the control
    assert _largest_difference(upgraded_steps, original_steps) > 100 * TOL  # the probes are live


@pytest.mark.slow
def test_generate_with_transformers_compile_config_on_the_cpu():
    """transformers' own path: ``compile_config`` (fullgraph, Inductor; ``_compile_all_devices``
    lets it compile on the CPU) gives the eager upgraded model's tokens and logits."""
    from torch._dynamo.utils import counters

    _, model = _models("llama")
    ids, mask = _prompts(model.config.vocab_size)[1]
    want = _generate(model, ids, mask)
    config = transformers.CompileConfig(fullgraph=True, backend="inductor", mode="default")
    config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    got = _generate(model, ids, mask, compile_config=config)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    _assert_same_steps(got, want, TOL)


# ------------------------------------------------------------------ GPU: CUDA graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family, which", [("llama", "upgraded"), ("llama", "upgraded-triton"),
                                           ("llama", "original"), ("qwen3", "upgraded"),
                                           ("qwen3", "upgraded-triton")])
def test_gpu_decode_step_is_cuda_graph_captured(family, which, monkeypatch):
    """generate with a static cache and ``compile_config(fullgraph=True, mode="reduce-overhead")``
    on CUDA (fp32), both prompts: tokens and every step's logits equal eager generation over
    several CUDA-graph replays; no cudagraph skip; graphs recorded. ``upgraded-triton`` forces the
    Triton kernel for fp32 (autotuned in the warm-up run, then captured); ``original`` is the control."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor import cudagraph_trees

    from parallax_compile.kernels import triton_parallax as tp

    original, upgraded = _models(family)
    model = (original if which == "original" else upgraded).cuda()
    kernel_calls = []
    if which == "upgraded-triton":
        monkeypatch.setattr(tp, "GPU_FP32", True)
        real = tp.parallax_fwd
        monkeypatch.setattr(tp, "parallax_fwd",
                            lambda *a, **k: kernel_calls.append(a[0].shape[2]) or real(*a, **k))
    kw = {"max_new_tokens": 10}  # per prompt: the first compiled step warms up, the second records, 7 replay
    prompts = _prompts(model.config.vocab_size, "cuda")
    want = [_generate(model, ids, mask, disable_compile=True, **kw) for ids, mask in prompts]
    torch._dynamo.reset()
    counters.clear()
    kernel_calls.clear()
    compile_config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    has_or_error = hasattr(inductor_config.triton, "cudagraph_or_error")
    skip_is_error = {"triton.cudagraph_or_error": True} if has_or_error else {}  # a skip raises
    with inductor_config.patch(skip_is_error):
        got = [_generate(model, ids, mask, compile_config=compile_config, **kw) for ids, mask in prompts]
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and any(manager.roots.values()), "no CUDA graph was recorded"
    for g, w in zip(got, want):
        assert torch.equal(g.sequences, w.sequences), (g.sequences, w.sequences)
        for a, b in zip(g.logits, w.logits):
            torch.testing.assert_close(a, b, atol=GPU_TOL, rtol=GPU_TOL)
    if which != "original":
        assert _largest_difference(want, [_generate(original.cuda(), ids, mask, disable_compile=True, **kw)
                                          for ids, mask in prompts]) > 1000 * GPU_TOL  # probes live
    if which == "upgraded-triton":  # calls since the compiled runs began with one query row: the decode step
        assert 1 in kernel_calls, kernel_calls  # the Triton kernel ran (warm-up, recording) in the step
