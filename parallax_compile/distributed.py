"""Train converted models on PyTorch's own distributed engines: FSDP2, DDP, DTensor tensor
parallel, Distributed Checkpoint (DCP). Nothing here reimplements data parallelism; each function
applies a ``torch.distributed`` API to a converted Hugging Face model (:func:`parallax_compile.hf.upgrade`)
in the way that keeps the probe ``W_R`` (``<owner>.r_proj.weight``) and its gain
(``<owner>.r_gain``, ``[Hq]``) right.

* :func:`init` -- ``init_process_group`` from ``torchrun``'s environment (NCCL on CUDA, gloo on
  the CPU) and the rank's device.
* :func:`apply_fsdp` -- ``fully_shard`` on every decoder layer and on the root, optional bf16
  ``MixedPrecisionPolicy``; :func:`apply_activation_checkpointing`, :func:`compile_layers` compose
  with it (regional compile, one graph per layer).
* :func:`apply_ddp` -- ``DistributedDataParallel``.
* :func:`tp_plan` / :func:`apply_tp` -- tensor parallel: the model's own
  ``config.base_model_tp_plan`` (transformers' conventions, ``layers.*.self_attn.q_proj:
  colwise``) plus the probe, applied with ``parallelize_module``. ``r_proj`` gets ``q_proj``'s
  style (column-wise: rank ``i`` holds the rows of its query heads, exactly as ``q_proj``), the
  gain ``r_gain`` ``[Hq]`` is sharded ``Shard(0)`` over the same heads, and ``o_proj`` row-wise,
  so each rank runs the op on its own heads ``[B, Hq / tp, L, D]`` with its KV heads
  ``[B, Hkv / tp, L, D]``.
* :func:`save_checkpoint` / :func:`load_checkpoint` -- DCP save / resume of the sharded model and
  optimizer through ``get_state_dict`` / ``set_state_dict`` (any of the strategies above, and a
  different world size on resume); :func:`checkpoint_to_conversion` writes a DCP checkpoint back
  as a conversion directory that ``parallax-compile verify`` accepts (one process, no collective).

Needs the ``models`` extra (transformers) for the Hugging Face parts.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "apply_activation_checkpointing",
    "apply_ddp",
    "apply_fsdp",
    "apply_tp",
    "checkpoint_to_conversion",
    "compile_layers",
    "decoder_layers",
    "init",
    "load_checkpoint",
    "save_checkpoint",
    "tp_plan",
]

# transformers' tensor-parallel style names -> what ``apply_tp`` does with them
_COLWISE, _ROWWISE, _REPLICATED_GRAD = "colwise", "rowwise", "replicated_with_grad_allreduce"


def init(backend: str | None = None) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``: initialise the default process group from ``torchrun``'s
    environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) unless one exists.
    ``backend`` defaults to ``nccl`` when CUDA is available (each rank on ``cuda:LOCAL_RANK``), else
    ``gloo`` on the CPU. Raises ``RuntimeError`` when the environment names no rank."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("distributed.init: RANK / WORLD_SIZE are not set; start the script with torchrun")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    return dist.get_rank(), dist.get_world_size(), device


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (classes named in ``_no_split_modules``, e.g.
    ``LlamaDecoderLayer``), in order. Raises ``ValueError`` when there are none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"decoder_layers: {type(model).__name__} names no repeated block in `_no_split_modules`")
    return layers


def apply_fsdp(model: nn.Module, *, mesh=None, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` on each decoder layer, then on ``model`` (embeddings, final norm,
    head; tied embeddings stay one parameter). ``param_dtype=torch.bfloat16`` computes in bf16 with
    fp32 parameters and fp32 gradient reduction (``MixedPrecisionPolicy``). Every parameter,
    probes included, becomes a ``DTensor`` sharded ``Shard(0)`` over ``mesh`` (default: all
    ranks). Apply :func:`apply_activation_checkpointing` and :func:`compile_layers` first or after:
    both keep parameter names. Returns ``model`` (changed in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder layer in backward: transformers' ``activation_checkpointing_enable``
    (``gradient_checkpointing_enable`` before 5.2x) with non-reentrant ``torch.utils.checkpoint``;
    the probe hook runs again in the recompute."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def compile_layers(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``: parameter names and
    checkpoint keys unchanged; identical layers share one graph). ``compile_kwargs`` go to
    ``torch.compile`` (``backend``, ``mode``...)."""
    for layer in decoder_layers(model):
        layer.compile(**compile_kwargs)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` on ``device`` (gradients all-reduced, averaged)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# --- tensor parallel --------------------------------------------------------------------------

def _probe_owners(model: nn.Module) -> dict[str, str]:
    """``{owner path: query projection attribute}`` of an upgraded model (``config.parallax_probes``:
    ``{owner: [Hq * D, in]}``, the probe's shape, whose projection is the owner's ``q_proj``; or
    ``{owner: attribute}`` written by an older version). Raises ``ValueError`` for an owner with a
    shape and no ``q_proj`` (a fused QKV projection has no query-only plan)."""
    probes = getattr(model.config, "parallax_probes", None) or {}
    if not isinstance(probes, dict):
        probes = {o: "q_proj" for o in probes}
    owners = {}
    for owner, value in probes.items():
        if isinstance(value, str):
            owners[owner] = value.rsplit(".", 1)[-1]
        elif isinstance(getattr(model.get_submodule(owner), "q_proj", None), nn.Module):
            owners[owner] = "q_proj"
        else:
            raise ValueError(f"tp_plan: `{owner}` has no query-only projection `q_proj` (a fused QKV layout has no "
                             "query-only plan)")
    return owners


def _generic(path: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


def tp_plan(model: nn.Module) -> dict[str, str]:
    """The tensor-parallel plan of an upgraded transformers model, in transformers' conventions
    (``config.base_model_tp_plan``: keys relative to the base model, ``*`` for the layer index,
    styles ``"colwise"`` / ``"rowwise"`` / ``"replicated_with_grad_allreduce"``), with the probe:
    ``layers.*.self_attn.r_proj`` gets the style of the query projection and
    ``layers.*.self_attn.r_gain`` (a parameter, ``[Hq]``) ``"colwise"`` -- its one dim is the
    query heads, sharded like ``q_proj``'s output features. Raises ``ValueError`` when the model
    has no plan for its query projections."""
    base = dict(getattr(model.config, "base_model_tp_plan", None) or {})
    prefix = getattr(model, "base_model_prefix", "") + "."
    plan = dict(base)
    for owner, proj in _probe_owners(model).items():
        rel = _generic(owner[len(prefix):] if owner.startswith(prefix) else owner)
        style = base.get(f"{rel}.{proj}")
        if style != _COLWISE:
            raise ValueError(f"tp_plan: {type(model).__name__}'s plan gives `{rel}.{proj}` {style!r}; the probe "
                             "needs a column-wise query projection (a fused QKV layout has no query-only plan)")
        module = model.get_submodule(owner)
        for name in dir(module):
            if re.fullmatch(r"r_proj(_\d+)?", name):
                plan[f"{rel}.{name}"] = style
            elif re.fullmatch(r"r_gain(_\d+)?", name) and isinstance(getattr(module, name), nn.Parameter):
                plan[f"{rel}.{name}"] = _COLWISE
    return plan


def apply_tp(model: nn.Module, mesh, plan: dict[str, str] | None = None) -> nn.Module:
    """Tensor parallel over the 1-D ``mesh`` with ``parallelize_module``: ``plan`` (default
    :func:`tp_plan`) keys are expanded over the layers (relative to ``model.base_model_prefix``);
    ``"colwise"`` modules get ``ColwiseParallel()``, ``"rowwise"`` ``RowwiseParallel()``,
    ``"colwise"`` parameters (``r_gain``) become ``Shard(0)`` DTensors, and
    ``"replicated_with_grad_allreduce"`` modules keep full weights whose gradients are summed over
    the mesh (per-head norms see only their rank's heads). Everything else (embeddings, norms,
    head) stays replicated; every rank must get the same batch. The probe's pre-hook on each owner
    computes this rank's r heads from the column-wise ``r_proj``. Raises ``ValueError`` when
    the heads or KV heads do not divide by the mesh size, or for a style it does not know."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = tp_plan(model) if plan is None else plan
    size = mesh.size()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for field in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(cfg, field, None)
        if n is not None and n % size:
            raise ValueError(f"apply_tp: {field}={n} does not divide by the mesh size {size}")
    prefix = getattr(model, "base_model_prefix", "")
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    styles, sharded, grad_reduce = {}, [], []
    for key, style in plan.items():
        full = re.compile(re.escape(f"{prefix}.{key}" if prefix else key).replace(r"\*", r"\d+") + "$")
        if style not in (_COLWISE, _ROWWISE, _REPLICATED_GRAD):
            raise ValueError(f"apply_tp: style {style!r} of `{key}` is not supported ({_COLWISE}, {_ROWWISE}, "
                             f"{_REPLICATED_GRAD})")
        for name in filter(full.match, params):  # a parameter entry: r_gain [Hq]
            if style != _COLWISE:
                raise ValueError(f"apply_tp: parameter `{key}` must be {_COLWISE!r} (Shard(0)), got {style!r}")
            sharded.append(name)
        for name in filter(full.match, modules):
            if style == _REPLICATED_GRAD:
                grad_reduce.append(modules[name])
            else:
                styles[name] = ColwiseParallel() if style == _COLWISE else RowwiseParallel()
    parallelize_module(model, mesh, styles)
    for name in sharded:
        owner_path, leaf = name.rsplit(".", 1)
        owner, p = model.get_submodule(owner_path), params[name]
        setattr(owner, leaf, nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)]), requires_grad=p.requires_grad))
    group = mesh.get_group()
    for module in grad_reduce:
        for p in module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda q: dist.all_reduce(q.grad, group=group))
    # The probe's pre-hook on each owner (hf.upgrade.add_probes) calls the column-wise ``r_proj`` on the
    # replicated block input: it gets this rank's r heads ``[B, L, Hq / tp * D]`` (local tensor, like
    # q_proj's output), runs them through the replicated q-norm and rotary, and the attention
    # multiplies them by the local shard of ``r_gain``. Nothing to re-register.
    return model


# --- Distributed Checkpoint -------------------------------------------------------------------

def save_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, step: int = 0) -> None:
    """DCP save (collective: every rank calls it) of ``model`` and ``optimizer`` (sharded as they
    are: FSDP2, TP, DDP or plain) and the step to directory ``path``. Parameter names are the
    unwrapped model's (no ``module.`` / ``_orig_mod.`` prefixes), so a checkpoint written under
    one strategy or world size resumes under another."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd, "train": {"step": torch.tensor(step)}}
    if optimizer is not None:
        state["optim"] = optim_sd
    with _single_process_is_meant():
        dcp.save(state, checkpoint_id=str(path))


@contextlib.contextmanager
def _single_process_is_meant():
    """DCP warns "torch.distributed is ... uninitialized, assuming the intent is to load/save in a
    single process" whenever no process group is up, even for ``no_dist=True``: here one process
    (``--strategy none``, the export) is the intent, so the warning is dropped; nothing else is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")
        yield


def load_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """DCP load of a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``) as they
    are sharded now; returns the saved step. Raises ``FileNotFoundError`` when ``path`` holds no
    checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (Path(path) / ".metadata").is_file():
        raise FileNotFoundError(f"load_checkpoint: {path} holds no DCP checkpoint (no .metadata)")
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd, "train": {"step": torch.tensor(0)}}
    if optimizer is not None:
        state["optim"] = optim_sd
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    return int(state["train"]["step"])


def checkpoint_to_conversion(checkpoint, base_dir, out_dir, *, overwrite: bool = False) -> Path:
    """Write the model of DCP checkpoint ``checkpoint`` as a conversion directory ``out_dir``: the
    converted model of ``base_dir`` (a directory written by ``parallax-compile convert`` /
    :func:`parallax_compile.hf.save_hf`) with the checkpoint's weights, saved with
    ``save_pretrained``, plus ``base_dir``'s report, reference outputs and tokenizer files, so
    ``parallax-compile verify`` and ``export`` accept it (after full fine-tuning ``verify`` says that
    the comparison with the original model no longer applies). Runs in one process (no collective,
    also on one rank of a process group). Raises ``FileExistsError`` when ``out_dir`` is not empty
    and ``overwrite`` is false."""
    import torch.distributed.checkpoint as dcp

    from . import hf

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"checkpoint_to_conversion: {out_dir} is not empty (pass overwrite=True)")
    model = hf.from_pretrained(base_dir, dtype=torch.float32)
    state = {"model": model.state_dict()}
    # this process alone, even inside a process group (rank 0 after training); raises when a
    # parameter is missing from the checkpoint
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    model.load_state_dict(state["model"])
    # the conversion directory of any save: manifest (weights recorded as trained), reference, tokenizer
    hf.save_hf(model, out_dir, trained=True, overwrite=True, tokenizer_dir=base_dir)
    return out_dir
