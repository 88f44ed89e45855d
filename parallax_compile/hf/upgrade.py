"""Upgrade a transformers model in place to Parallax attention: it stays that transformers model
(``generate()``, padding, KV cache, ``save_pretrained``).

1. **Find** (the graph passes): ``torch.export`` the model on example inputs, match the attention
   sites and walk each site's query chain back to its projection
   (:func:`parallax_compile.convert.prepare_sites`). A site is upgraded when its projection (a
   query-only ``q_proj`` or a fused QKV projection: GPT-2's ``c_attn``, Phi-3's ``qkv_proj``,
   GPT-NeoX's per-head ``query_key_value``) is a child of the module that owns the attention.
2. **Upgrade** (module level, no graph): each owning module gets a probe ``r_proj =
   nn.Linear(in, Hq * D, bias=False)`` (random like the q rows of ``W_Q``), a per-head gain
   ``r_gain`` ``[Hq]`` (zero) and a forward pre-hook that computes ``r`` from the module's input
   ``x`` (``hidden_states``) with the module's own per-head norm (``q_norm``) and rotary
   embedding (the family's ``apply_rotary_pos_emb`` with the ``position_embeddings`` the module
   receives: partial rotary included) and hands it to the attention function as the keyword
   ``parallax_r``, which transformers' attention modules pass through ``**kwargs``. So ``r``
   never passes through a fused split, a view that puts heads on another axis (OPT), or a scale
   folded into the projection (OPT's ``q_proj(x) * scaling``; SPEC section 5: no temperature on
   ``r``); ``r`` is computed for the new tokens only and never cached. The model switches to the
   ``parallax`` attention implementation (:mod:`parallax_compile.hf.attention`);
   ``config.parallax_probes`` lists the owners and probe shapes so :func:`from_pretrained` can
   rebuild them.
3. **Verify**: (a) the probe chain is the module's query chain: with ``W_R`` set to the q rows of
   ``W_Q``, the projection's bias at zero and the gain at one, ``r`` times the scale the chain
   folds into ``q`` equals ``q`` in every upgraded module; (b) at gain 0 the model's outputs equal
   the original's on the example inputs (non-padding positions,
   :data:`parallax_compile.convert.TOLERANCE`) and every owner's attention ran through the Parallax
   function; (c) the gains' gradients are finite and a small step on the gains moves the outputs in
   proportion (:func:`parallax_compile.probes.check_continuity`). Otherwise everything is undone and
   ``NotUpgradable`` / ``RuntimeError`` says why.

Models whose attention does not go through ``AttentionInterface`` (GPT-Neo, Bloom, Falcon, MPT in
transformers 5) are refused with :class:`NotUpgradable`; :func:`parallax_compile.convert` (the
graph path) converts them.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from ..checks import (TOLERANCE, float64_outputs, main_output, outputs_error, relative_error, tensor_digests,
                      weights_digest, within_fp32_rounding)
from ..convert import ConversionInfo
from ..probes import check_continuity, init_probe_weight, new_gain
from . import attention

__all__ = ["add_probes", "find_probe_sites", "from_pretrained", "is_hf_model", "probe_heads", "remove_probes",
           "upgrade"]


class NotUpgradable(RuntimeError):
    """The model cannot be upgraded in place (its attention does not go through transformers'
    ``AttentionInterface``, or no site's query chain can be given a probe); nothing was changed.
    The graph converter (:func:`parallax_compile.convert`) may still handle it."""


def is_hf_model(model) -> bool:
    """A transformers ``PreTrainedModel`` that dispatches attention through ``AttentionInterface``."""
    return _is_pretrained(model) and bool(getattr(model, "_supports_attention_backend", False))


def _is_pretrained(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


@dataclass
class ProbePlan:
    """How one attention module gets its probe (from the graph passes)."""

    projection: str
    """Path of the query (or fused QKV) projection, a child of the owner."""
    out_features: int
    """``Hq * D``: rows of ``W_R``."""
    in_features: int
    query_weight: torch.Tensor
    """The q rows of ``W_Q`` ``[Hq * D, in]``, in head-major order (what ``W_R`` replaces)."""
    scale: float = 1.0
    """A number the module's chain multiplies ``q`` by and ``r`` must not get (OPT's ``scaling``)."""


def find_probe_sites(model, example_inputs, *, dynamic_dims=None):
    """``(sites, plan, capture)``: every attention site the graph passes find, each marked
    rewritable or skipped with its reason, and ``plan = {owner path: ProbePlan}`` for the
    upgradable ones."""
    from ..convert import prepare_sites
    from ..passes.capture import capture
    from ..passes.query_chain import dropped_scale

    cap = capture(model, example_inputs, dynamic_dims=dynamic_dims, dynamic=False)
    sites, chains, _ = prepare_sites(cap)
    plan = {}
    for site in sites:
        chain = chains.get(id(site))
        if chain is None:
            continue
        proj_path, owner = chain.weight.rsplit(".", 1)[0], site.module_path
        if proj_path.rsplit(".", 1)[0] != owner or chain.weight_rows is not None:
            site.skip(f"the query projection `{chain.weight}` is not a projection module child of `{owner}`")
        elif owner in plan:
            site.skip(f"`{owner}` has several attention sites")
        else:
            w_q = chain.query_weight(model.get_parameter(chain.weight)).detach().clone()
            plan[owner] = ProbePlan(proj_path, chain.out_features, chain.in_features, w_q, dropped_scale(cap.gm, chain))
            site.rewritable, site.reason = True, None
            site.probe = f"{owner}.r_proj.weight"
    return sites, plan, cap


def _head_dim(owner) -> int:
    d = getattr(owner, "head_dim", None) or getattr(owner, "head_size", None)
    if not isinstance(d, int):
        raise NotUpgradable(f"{type(owner).__name__} has no integer `head_dim` / `head_size`")
    return d


def probe_heads(owner, x: torch.Tensor, position_embeddings=None) -> torch.Tensor:
    """``r`` before the gain, ``[B, Hq, L, D]``, from the block input ``x`` ``[B, L, in]``: the probe
    ``W_R x`` split into heads, the module's per-head ``q_norm`` (when it has one), and the family's
    ``apply_rotary_pos_emb`` with ``position_embeddings = (cos, sin)`` (when the module gets them)."""
    r = owner.r_proj(x)  # the module, not its weight: a wrapper (a PEFT LoRA layer on r_proj) takes part
    r = r.view(*x.shape[:-1], -1, _head_dim(owner))
    norm = getattr(owner, "q_norm", None)
    if norm is not None:
        r = norm(r)
    r = r.transpose(1, 2)
    if position_embeddings is not None:
        rotary = getattr(sys.modules[type(owner).__module__], "apply_rotary_pos_emb")
        cos, sin = position_embeddings
        # The family's function rotates a (q, k) pair: k is one head of r (a valid MQA k), not a
        # second full copy of r, and its result is dropped.
        r = rotary(r, r[:, :1], cos, sin)[0]
    return r


def _probe_hook(positions, owner, args, kwargs):
    """Forward pre-hook: pass ``parallax_r`` (:func:`probe_heads`) to the attention function."""
    def arg(name):
        if name in kwargs:
            return kwargs[name]
        i = positions.get(name)
        return args[i] if i is not None and i < len(args) else None

    r = probe_heads(owner, arg("hidden_states"), arg("position_embeddings"))
    return args, {**kwargs, "parallax_r": r}


def _probe_shape(owner, value) -> tuple[list[int], torch.Tensor | None]:
    """``([Hq * D, in], W_Q rows or None)`` from a value of :func:`add_probes`' ``probes``."""
    if isinstance(value, torch.Tensor):
        return list(value.shape), value
    if isinstance(value, str):  # a directory written before the pre-hook: {owner: query projection attribute}
        w = getattr(owner, value.rsplit(".", 1)[-1]).weight
        return list(w.shape), w
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(n, int) for n in value):
        return list(value), None
    raise ValueError(f"parallax_probes: expected [Hq * D, in] (or a query projection name) for an owner, "
                     f"got {value!r}")


def add_probes(model, probes: dict) -> None:
    """Give each owner module (path) a probe ``r_proj = nn.Linear(in, Hq * D, bias=False)`` and a
    zero gain ``r_gain`` ``[Hq]``, and the forward pre-hook that computes ``r``
    (:func:`probe_heads`); switch the model to ``parallax`` attention and record
    ``config.parallax_probes = {owner: [Hq * D, in]}``. ``probes[owner]`` is the q rows of ``W_Q``
    (``[Hq * D, in]``: ``W_R`` is random with their std), or the shape ``[Hq * D, in]`` (a model
    built from its config, whose weights are loaded after: ``W_R`` random with ``initializer_range``),
    or the name of a query projection child (directories written before the shape was recorded).
    Raises ``ValueError`` for another value."""
    attention.register()
    shapes = {}
    for owner_path, value in probes.items():
        owner = model.get_submodule(owner_path)
        shape, w_q = _probe_shape(owner, value)
        if not hasattr(owner, "r_proj"):
            ref = next(owner.parameters())
            owner.r_proj = torch.nn.Linear(shape[1], shape[0], bias=False, device=ref.device, dtype=ref.dtype)
            if w_q is not None:
                init_probe_weight(owner.r_proj.weight, w_q)
            elif ref.device.type != "meta":
                std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
                with torch.no_grad():
                    owner.r_proj.weight.normal_(0.0, std)
        if not hasattr(owner, "r_gain"):
            owner.r_gain = new_gain(shape[0] // _head_dim(owner), owner.r_proj.weight)
        names = list(inspect.signature(owner.forward).parameters)
        positions = {n: names.index(n) for n in ("hidden_states", "position_embeddings") if n in names}
        owner._parallax_hook = owner.register_forward_pre_hook(functools.partial(_probe_hook, positions),
                                                               with_kwargs=True)
        owner.parallax_probe = True
        shapes[owner_path] = shape
    model.config.parallax_probes = shapes
    model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)


def remove_probes(model, owners, previous_impl: str) -> None:
    """Undo :func:`add_probes`."""
    for owner_path in owners:
        owner = model.get_submodule(owner_path)
        hook = getattr(owner, "_parallax_hook", None)
        if hook is not None:
            hook.remove()
            del owner._parallax_hook
        for attr in ("r_proj", "r_gain", "parallax_probe"):
            if hasattr(owner, attr):
                delattr(owner, attr)
    if hasattr(model.config, "parallax_probes"):
        del model.config.parallax_probes
    model.set_attn_implementation(previous_impl)


def original_float64(model, owners, previous_impl: str, args, kwargs):
    """The outputs of the original model (a copy of the upgraded ``model`` with the probes of
    ``owners`` removed and attention ``previous_impl``) in float64, for
    :func:`~parallax_compile.checks.within_fp32_rounding`; ``None`` when it cannot run in float64."""
    return float64_outputs(model, args, kwargs, outputs=main_output,
                           prepare=lambda m: remove_probes(m, owners, previous_impl))


def _check_chain(model, plan: dict[str, ProbePlan], args, kwargs) -> list[str]:
    """Verify step (a): the owners whose probe chain does not reproduce their query chain."""
    seen, bad = {}, []

    def observe(module, q, r, *_):
        seen[id(module)] = (q.detach(), r.detach())

    saved = {}
    with torch.no_grad():
        for owner_path, p in plan.items():
            owner, proj = model.get_submodule(owner_path), model.get_submodule(p.projection)
            bias = getattr(proj, "bias", None)
            saved[owner_path] = (owner.r_proj.weight.clone(), owner.r_gain.clone(), None if bias is None else bias.clone())
            owner.r_proj.weight.copy_(p.query_weight)
            owner.r_gain.fill_(1.0)
            if bias is not None:
                bias.zero_()
        attention.OBSERVERS.append(observe)
        try:
            model(*args, **kwargs)
        finally:
            attention.OBSERVERS.remove(observe)
            for owner_path, (w, g, b) in saved.items():
                owner, proj = model.get_submodule(owner_path), model.get_submodule(plan[owner_path].projection)
                owner.r_proj.weight.copy_(w)
                owner.r_gain.copy_(g)
                if b is not None:
                    proj.bias.copy_(b)
    for owner_path, p in plan.items():
        q, r = seen.get(id(model.get_submodule(owner_path)), (None, None))
        if q is None or q.shape != r.shape or relative_error(r * p.scale, q) > TOLERANCE.get(q.dtype, 1e-5):
            bad.append(owner_path)
    return bad


def _own_config(model) -> None:
    """Give ``model`` (and its submodules that share it) a copy of its config: the upgrade writes
    ``parallax_probes`` and the attention implementation into it, which must not reach another
    model built from the same config object."""
    memo: dict = {}
    copy.deepcopy(model.config, memo)  # memo: id(config or sub-config) -> its copy
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and id(c) in memo:
            m.config = memo[id(c)]


def upgrade(model, example_inputs, *, dynamic_dims=None, valid_positions=None) -> ConversionInfo:
    """Upgrade ``model`` (a transformers model, eval mode, ``sdpa`` or ``eager`` attention) in place
    to Parallax attention with probes at gain 0 and verify it (module docstring). Returns the report
    (``sites``, ``max_output_error``, ``reference_outputs``). Raises ``TypeError`` for an object
    that is not a transformers model, :class:`NotUpgradable` for a model whose attention does not go
    through ``AttentionInterface`` or when no site can be upgraded, ``RuntimeError`` when the check
    fails (the model is then left as it was)."""
    if not _is_pretrained(model):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if not is_hf_model(model):
        raise NotUpgradable(f"{type(model).__name__} ({model.config.model_type}) does not route attention through "
                            "transformers' AttentionInterface, so it cannot be upgraded in place; convert it with "
                            "parallax_compile.convert (the graph path)")
    if getattr(model.config, "parallax_probes", None):
        raise ValueError(f"{type(model).__name__} is already upgraded (config.parallax_probes is set)")
    _own_config(model)
    if isinstance(example_inputs, dict):  # capture and compare logits, not a KV cache object
        example_inputs = {**example_inputs, "use_cache": example_inputs.get("use_cache", False)}
    sites, plan, cap = find_probe_sites(model, example_inputs, dynamic_dims=dynamic_dims)
    if not plan:
        reasons = "; ".join(sorted({s.reason for s in sites if s.reason})) or "no attention found"
        raise NotUpgradable(f"no attention site of {type(model).__name__} can be upgraded: {reasons}")
    args, kwargs = cap.args, {**cap.kwargs, "use_cache": False} if _takes_use_cache(model) else cap.kwargs
    with torch.no_grad():
        ref = main_output(model(*args, **kwargs))
    previous = model.config._attn_implementation
    owners = list(plan)
    add_probes(model, {o: p.query_weight for o, p in plan.items()})
    try:
        bad = _check_chain(model, plan, args, kwargs)
        if bad:
            raise NotUpgradable(f"the probe chain of {bad} ({model.config.model_type}) does not reproduce the module's "
                                "query chain; convert the model with parallax_compile.convert (the graph path)")
        attention.CALLS.clear()
        attention.RECORD = True
        try:
            out = main_output(model(*args, **kwargs))
        finally:
            attention.RECORD = False
        missing = [o for o in owners if attention.CALLS.get(id(model.get_submodule(o)), 0) == 0]
        if missing:
            raise RuntimeError(f"the attention of {missing} did not run through the parallax implementation")
        worst, ok = outputs_error(out, ref, valid_positions)
        if not ok:
            ok = within_fp32_rounding(out, ref, original_float64(model, owners, previous, args, kwargs),
                                      valid_positions)
        if not ok:
            raise RuntimeError(f"the model's outputs changed by {worst:.2e} (relative) at r_gain = 0")
        gains = [model.get_submodule(o).r_gain for o in owners]
        floats = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if floats:
            gen = torch.Generator().manual_seed(0)
            loss = sum((t @ torch.randn(t.shape[-1:], generator=gen, dtype=t.dtype).to(t.device)).sum() for t in floats)
            grads = torch.autograd.grad(loss, gains, allow_unused=True)
            bad = [o for o, g in zip(owners, grads) if g is None or not bool(torch.isfinite(g).all())]
            if bad:
                raise RuntimeError(f"the probe gain gradient of {bad} is missing or not finite at r = 0")
        continuity = check_continuity(lambda: main_output(model(*args, **kwargs)), gains, out)
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


def _takes_use_cache(model) -> bool:
    return "use_cache" in inspect.signature(model.forward).parameters


def from_pretrained(path, **kwargs):
    """Load a Hugging Face conversion directory (``save_pretrained`` after :func:`upgrade`, or
    ``parallax-compile convert``): the transformers model of class ``Parallax<Base>`` with
    ``attn_implementation="parallax"`` and its probes. ``kwargs`` go to ``from_pretrained``
    (``dtype``, ``device_map``...). Same as ``AutoModelForCausalLM.from_pretrained(path)`` after
    ``import parallax_compile``, and also reads directories written before that. Raises
    ``ValueError`` when the directory holds no Parallax model."""
    from .auto import load_pretrained

    return load_pretrained(path, **kwargs)
