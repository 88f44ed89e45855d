"""A converted model trains: a few AdamW steps on real text (Python's reference manual, from
``pydoc_data``) move every probe ``W_R`` away from zero and lower the training loss.

* nanoGPT (hand-written attention, byte-level): 20 steps, batches of 8 x 64 bytes.
* tiny Llama (sdpa, GQA, RoPE): 20 steps on the same text as ids in [1, 128), loss computed from
  the logits (the converted graph was captured without ``labels``).

The converted module is called with the same keyword inputs as the example it was captured on
(other batch sizes and lengths are fine: batch and sequence dims are dynamic). Everything runs
under fixed seeds.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import fx
from torch.nn import functional as F

import parallax_compile as pc
from parallax_compile.models import load_model, text

STEPS, LR = 20, 1e-3


def _probes(gm: fx.GraphModule) -> dict[str, torch.nn.Parameter]:
    info = gm.meta["parallax"]
    assert info.rewritten and not info.skipped
    return dict(pc.named_probe_parameters(gm))


def _train(gm: fx.GraphModule, loss_of: Callable[[torch.Generator], torch.Tensor]) -> list[float]:
    """``STEPS`` AdamW steps on every parameter of ``gm``; returns the training loss per step."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(gm.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        loss = loss_of(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_trained(losses: list[float], probes: dict[str, torch.nn.Parameter]) -> None:
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, f"loss did not go down: first 3 steps {first:.3f}, last 3 {last:.3f}"
    for name, p in probes.items():
        assert torch.isfinite(p).all(), name
        if name.endswith("r_gain"):  # the gains start at zero and must have moved
            assert p.detach().abs().max() > 1e-5, f"{name} stayed at zero"


def test_converted_nanogpt_trains_on_real_text():
    loaded = load_model("nanogpt")
    gm = pc.convert(loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims)
    probes = _probes(gm)
    assert len(probes) == 2 * loaded.model.config.n_layer  # W_R and its gain per layer
    assert all(bool((p == 0).all()) for n, p in probes.items() if n.endswith("r_gain"))
    train, _ = text.train_val_split(0.1)

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        x, y = text.get_batch(train, 8, 64, gen)  # another batch size than the example's [2, 64]
        logits = gm(idx=x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    losses = _train(gm, loss_of)
    _assert_trained(losses, probes)


def _ascii_ids(data: torch.Tensor) -> torch.Tensor:
    """Bytes as ids for a 128-word vocabulary: 0 is the pad id, non-ASCII bytes fold into 1..127."""
    return (data % 127) + 1


def test_converted_tiny_llama_trains_on_real_text():
    pytest.importorskip("transformers")
    loaded = load_model("tiny-llama-sdpa")
    gm = pc.convert(
        loaded.model, loaded.example_inputs, dynamic_dims=loaded.dynamic_dims, valid_positions=loaded.valid_positions
    )
    probes = _probes(gm)
    assert len(probes) == 2 * loaded.model.config.num_hidden_layers
    train, _ = text.train_val_split(0.1)
    batch, length = 4, 32

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        x, _ = text.get_batch(train, batch, length, gen)
        ids = _ascii_ids(x)
        out = gm(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(length).expand(batch, length),
            use_cache=False,
        )
        logits = out.logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    losses = _train(gm, loss_of)
    _assert_trained(losses, probes)
