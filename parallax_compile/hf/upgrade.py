"""Upgrade a transformers model in place to Parallax attention: it stays that transformers model
(``generate()``, padding, KV cache, ``save_pretrained``).

1. **Find** (the graph passes): ``torch.export`` the model on example inputs, match the attention
   sites and walk each site's query chain back to its projection
   (:func:`parallax_compile.convert.prepare_sites`). A site is upgraded when its owning module has
   that projection as an ``nn.Linear`` child producing exactly the query heads (a fused QKV
   projection is skipped with its reason).
2. **Upgrade** (module level, no graph): each owning module gets ``r_proj = nn.Linear(in, Hq * D,
   bias=False)`` (``W_R``, random like ``W_Q``), a zero per-head gain ``r_gain [Hq]`` (SPEC section
   7, :mod:`parallax_compile.probes`) and a forward hook on its query projection that appends
   ``r_proj(x)`` to the projection's output, so the module's own query chain (head reshape, per-head
   norm, rotary embedding) produces ``[q; r_raw]``; the attention function multiplies ``r_raw`` by the
   gain. The model switches to the ``parallax`` attention implementation
   (:mod:`parallax_compile.hf.attention`). ``config.parallax_probes`` lists the owners, so
   :func:`from_pretrained` can rebuild the probes.
3. **Verify**: at zero gain (``r = 0``) the model's outputs equal the original's on the example
   inputs (non-padding positions, :data:`parallax_compile.convert.TOLERANCE`), every owner's
   attention ran through the Parallax function, the gains' gradients are finite, and a small step on
   the gains moves the outputs in proportion (:func:`parallax_compile.probes.check_continuity`).
   Otherwise everything is undone and ``RuntimeError`` says why.
"""

from __future__ import annotations

import functools

import torch
from torch.utils import _pytree as pytree

from ..checks import TOLERANCE, relative_error, tensor_digests, weights_digest
from ..convert import ConversionInfo
from ..probes import check_continuity, init_probe_weight, new_gain
from . import attention

__all__ = ["add_probes", "find_probe_sites", "from_pretrained", "is_hf_model", "remove_probes", "upgrade"]


class NotUpgradable(RuntimeError):
    """The model cannot be upgraded in place (no site whose query projection is an ``nn.Linear``
    child of its attention module, e.g. GPT-2's fused ``c_attn``); nothing was changed. The graph
    converter (:func:`parallax_compile.convert`) may still handle it."""


def is_hf_model(model) -> bool:
    """A transformers ``PreTrainedModel`` that dispatches attention through ``AttentionInterface``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and bool(getattr(model, "_supports_attention_backend", False))


def find_probe_sites(model, example_inputs, *, dynamic_dims=None):
    """``(sites, plan, capture)``: every attention site the graph passes find, each marked
    rewritable or skipped with its reason, and ``plan = {owner path: query projection path}`` for
    the upgradable ones."""
    from ..convert import prepare_sites
    from ..passes.capture import capture

    cap = capture(model, example_inputs, dynamic_dims=dynamic_dims, dynamic=False)
    sites, chains, _ = prepare_sites(cap)
    plan = {}
    for site in sites:
        chain = chains.get(id(site))
        if chain is None:
            continue
        proj_path = chain.weight.rsplit(".", 1)[0]
        owner = site.module_path
        try:
            proj = model.get_submodule(proj_path)
        except AttributeError:
            proj = None
        if not isinstance(proj, torch.nn.Linear) or proj_path.rsplit(".", 1)[0] != owner:
            site.skip(f"the query projection `{proj_path}` is not an nn.Linear child of `{owner}`")
        elif chain.out_features != chain.fused_width or chain.offset != 0:
            site.skip(f"`{proj_path}` is a fused QKV projection; the module-level upgrade needs a "
                      "query-only projection")
        elif owner in plan:
            site.skip(f"`{owner}` has several attention sites")
        else:
            plan[owner] = proj_path
            site.rewritable, site.reason = True, None
            site.probe = f"{owner}.r_proj.weight"
    return sites, plan, cap


def _follow_projection(name, owner, _args):
    """Forward pre-hook of an owner: keep the probe hook on the module that is its query projection
    now. A wrapper (a PEFT LoRA layer) replaces ``q_proj`` and calls the old one as its base layer:
    the hook moves to the wrapper, so ``r`` is appended once, after the wrapper's own output."""
    proj = getattr(owner, name)
    if not any(isinstance(h, functools.partial) and h.func is _append_probe and h.args[0] is owner
               for h in proj._forward_hooks.values()):
        owner._parallax_hook.remove()
        owner._parallax_hook = proj.register_forward_hook(functools.partial(_append_probe, owner))


def _append_probe(owner, _module, args, out):
    # Call the module (not its weight): a wrapper such as a PEFT LoRA layer on r_proj takes part.
    return torch.cat([out, owner.r_proj(args[0])], dim=-1)


def _query_heads(model, owner, proj) -> int:
    head_dim = getattr(owner, "head_dim", None) or getattr(model.config, "head_dim", None)
    if not head_dim:
        head_dim = model.config.hidden_size // model.config.num_attention_heads
    if proj.out_features % head_dim:
        raise ValueError(f"the query projection of `{type(owner).__name__}` has {proj.out_features} outputs, "
                         f"not a multiple of head_dim={head_dim}")
    return proj.out_features // head_dim


def add_probes(model, owners: list[str], *, proj_name: str | dict[str, str] = "q_proj") -> None:
    """Give each owner module (path) ``r_proj`` shaped like its query projection (no bias; random
    like ``W_Q``), a zero gain ``r_gain [Hq]``, and the hook that stacks ``W_R x`` behind ``W_Q x``;
    switch the model to ``parallax`` attention and record the owners in ``config.parallax_probes``
    (``{owner: projection attribute}``)."""
    attention.register()
    names = {}
    for owner_path in owners:
        owner = model.get_submodule(owner_path)
        name = proj_name[owner_path].rsplit(".", 1)[-1] if isinstance(proj_name, dict) else proj_name
        proj = getattr(owner, name)
        if not hasattr(owner, "r_proj"):
            owner.r_proj = torch.nn.Linear(proj.in_features, proj.out_features, bias=False,
                                           device=proj.weight.device, dtype=proj.weight.dtype)
            init_probe_weight(owner.r_proj.weight, proj.weight)
        if not hasattr(owner, "r_gain"):
            owner.r_gain = new_gain(_query_heads(model, owner, proj), proj.weight)
        owner._parallax_hook = proj.register_forward_hook(functools.partial(_append_probe, owner))
        owner._parallax_follow = owner.register_forward_pre_hook(functools.partial(_follow_projection, name))
        owner.parallax_probe = True
        names[owner_path] = name
    model.config.parallax_probes = names
    model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)


def remove_probes(model, owners, previous_impl: str) -> None:
    """Undo :func:`add_probes`."""
    for owner_path in owners:
        owner = model.get_submodule(owner_path)
        for attr in ("_parallax_hook", "_parallax_follow"):
            hook = getattr(owner, attr, None)
            if hook is not None:
                hook.remove()
                delattr(owner, attr)
        for attr in ("r_proj", "r_gain", "parallax_probe"):
            if hasattr(owner, attr):
                delattr(owner, attr)
    if hasattr(model.config, "parallax_probes"):
        del model.config.parallax_probes
    model.set_attn_implementation(previous_impl)


def _split(example_inputs):
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def _max_error(new, ref, valid) -> tuple[float, bool]:
    worst, ok = 0.0, True
    for a, b in zip(pytree.tree_leaves(new), pytree.tree_leaves(ref)):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            err = relative_error(a, b, valid)
            worst, ok = max(worst, err), ok and err <= TOLERANCE.get(b.dtype, 1e-5)
    return worst, ok


def _outputs(out):
    """The tensors to compare: logits / last hidden state (not the KV cache object)."""
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


def _own_config(model) -> None:
    """Give ``model`` (and its submodules that share it) a copy of its config: the upgrade writes
    ``parallax_probes`` and the attention implementation into it, which must not reach another
    model built from the same config object."""
    import copy

    memo: dict = {}
    copy.deepcopy(model.config, memo)  # memo: id(config or sub-config) -> its copy
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and id(c) in memo:
            m.config = memo[id(c)]


def upgrade(model, example_inputs, *, dynamic_dims=None, valid_positions=None) -> ConversionInfo:
    """Upgrade ``model`` (a transformers model, eval mode, ``sdpa`` or ``eager`` attention) in place
    to Parallax attention with zero probes and verify it (module docstring). Returns the report
    (``sites``, ``max_output_error``, ``reference_outputs``). Raises ``TypeError`` for a model that
    does not use transformers' ``AttentionInterface``, ``RuntimeError`` when no site can be upgraded
    or the check fails (the model is then left as it was)."""
    if not is_hf_model(model):
        raise TypeError(f"{type(model).__name__} is not a transformers model that uses AttentionInterface")
    if getattr(model.config, "parallax_probes", None):
        raise ValueError(f"{type(model).__name__} is already upgraded (config.parallax_probes is set)")
    _own_config(model)
    if isinstance(example_inputs, dict):  # capture and compare logits, not a KV cache object
        example_inputs = {**example_inputs, "use_cache": example_inputs.get("use_cache", False)}
    sites, plan, cap = find_probe_sites(model, example_inputs, dynamic_dims=dynamic_dims)
    if not plan:
        reasons = "; ".join(sorted({s.reason for s in sites if s.reason})) or "no attention found"
        raise NotUpgradable(f"no attention site of {type(model).__name__} can be upgraded: {reasons}")
    args, kwargs = _split(example_inputs)
    with torch.no_grad():
        ref = _outputs(model(*args, **kwargs))
    previous = model.config._attn_implementation
    owners = list(plan)
    add_probes(model, owners, proj_name=plan)
    try:
        attention.CALLS.clear()
        attention.RECORD = True
        try:
            out = _outputs(model(*args, **kwargs))
        finally:
            attention.RECORD = False
        missing = [o for o in owners if attention.CALLS.get(id(model.get_submodule(o)), 0) == 0]
        if missing:
            raise RuntimeError(f"the attention of {missing} did not run through the parallax implementation")
        worst, ok = _max_error(out, ref, valid_positions)
        if not ok:
            raise RuntimeError(f"the model's outputs changed by {worst:.2e} (relative) at W_R = 0")
        gains = [model.get_submodule(o).r_gain for o in owners]
        floats = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if floats:
            gen = torch.Generator().manual_seed(0)
            loss = sum((t @ torch.randn(t.shape[-1:], generator=gen, dtype=t.dtype).to(t.device)).sum() for t in floats)
            grads = torch.autograd.grad(loss, gains, allow_unused=True)
            bad = [o for o, g in zip(owners, grads) if g is None or not bool(torch.isfinite(g).all())]
            if bad:
                raise RuntimeError(f"the probe gain gradient of {bad} is missing or not finite at r = 0")
        continuity = check_continuity(lambda: _outputs(model(*args, **kwargs)), gains, out)
        if not continuity["ok"]:
            raise RuntimeError(f"a step of {continuity['eps']:g} on the probe gains does not change the outputs "
                               f"in proportion (linearity error {continuity['linearity_error']:.2f})")
    except Exception:
        remove_probes(model, owners, previous)
        raise
    for s in sites:
        if s.rewritable:
            s.max_error = worst
    # The model stays a transformers model run eagerly: any batch size and length (the capture above
    # only served to find the sites).
    info = ConversionInfo(sites=sites, dynamic=True, note="", max_output_error=worst,
                          reference_outputs=ref.detach(), weights_digest=weights_digest(model),
                          digests=tensor_digests(model), example_args=args, example_kwargs=kwargs,
                          continuity=continuity)
    from .auto import to_parallax
    from .saving import conversion_record

    to_parallax(model, conversion_record(info))
    return info


def from_pretrained(path, **kwargs):
    """Load a Hugging Face conversion directory (``save_pretrained`` after :func:`upgrade`, or
    ``parallax-compile convert``): the transformers model of class ``Parallax<Base>`` with
    ``attn_implementation="parallax"`` and its probes. ``kwargs`` go to ``from_pretrained``
    (``dtype``, ``device_map``...). Same as ``AutoModelForCausalLM.from_pretrained(path)`` after
    ``import parallax_compile``, and also reads directories written before that. Raises
    ``ValueError`` when the directory holds no Parallax model."""
    from .auto import load_pretrained

    return load_pretrained(path, **kwargs)
