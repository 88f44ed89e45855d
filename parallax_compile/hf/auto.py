"""A converted Hugging Face model is a transformers model class of its own.

For a base architecture such as ``LlamaForCausalLM``, :func:`parallax_classes` makes (once) the
subclasses ``ParallaxLlamaConfig`` (``model_type = "parallax"``) and ``ParallaxLlamaForCausalLM``,
whose ``__init__`` adds the probes named in ``config.parallax_probes`` (``{owner: [Hq * D, in]}``,
the shape of ``W_R``; a query projection's attribute name in directories written before) with
:func:`~parallax_compile.hf.upgrade.add_probes`, so the probes (``r_proj``, ``r_gain``) are
ordinary weights that ``from_pretrained`` loads and ``save_pretrained`` writes.

``config.json`` of a converted model says ``"model_type": "parallax"``,
``"architectures": ["Parallax<Base>"]``, ``"parallax_base_architecture": "<Base>"``,
``"parallax_probes"`` and an ``auto_map`` pointing at ``parallax_model.py`` (written beside it,
two lines importing this module). So:

* after ``import parallax_compile`` (:func:`register`: ``AutoConfig.register("parallax", ...)``),
  ``AutoModelForCausalLM.from_pretrained(dir)`` returns the Parallax model with its probes;
* with ``trust_remote_code=True``, transformers imports ``parallax_model.py``, which needs the
  package installed (else transformers names the missing package);
* without the package, transformers refuses the unknown ``model_type`` -- it never loads the base
  model with the probe weights dropped.

``save_pretrained`` also writes the conversion directory's manifest and reference
(:mod:`parallax_compile.hf.saving`): a model put in training mode (``model.train()``, ``Trainer``,
PEFT) records its changed weights as trained; pass ``parallax_trained=`` to say otherwise.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch

from ..checks import is_probe
from . import attention
from .upgrade import add_probes

__all__ = ["CODE_FILE", "MODEL_TYPE", "ParallaxConfig", "load_pretrained", "parallax_classes", "register",
           "to_parallax"]

MODEL_TYPE = "parallax"
CODE_FILE = "parallax_model.py"


def _no_auto_class(cls, auto_class=None):
    """transformers registers a class loaded through ``auto_map`` "for auto class", which makes
    ``save_pretrained`` copy its source file; ours is ``parallax_model.py``, written by us."""


class _ParallaxMixin:
    """Methods of every ``Parallax<Base>`` model class (placed before the base in the MRO)."""

    parallax_base_architecture = ""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        probes = getattr(config, "parallax_probes", None)
        if not probes:
            raise ValueError(f"{type(self).__name__}: config.parallax_probes is empty; expected {{owner: [Hq * D, in]}}")
        add_probes(self, dict(probes))
        self.parallax_record = None
        self.parallax_trained = False

    def train(self, mode: bool = True):
        if mode:
            self.parallax_trained = True  # save_pretrained records the changed weights as trained
        return super().train(mode)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        kwargs.setdefault("attn_implementation", attention.ATTN_IMPLEMENTATION)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        missing = sorted(k for k in info.get("missing_keys", ()) if is_probe(k))
        gains = [k for k in missing if k.rsplit(".", 1)[-1].startswith("r_gain")]
        if len(gains) < len(missing):
            raise ValueError(f"{pretrained_model_name_or_path}: probe weights missing from the checkpoint: "
                             f"{[k for k in missing if k not in gains]}")
        if gains:
            with torch.no_grad():
                for name in gains:
                    model.get_parameter(name).fill_(1.0)
            warnings.warn(f"{pretrained_model_name_or_path} was saved before the probe gain r_gain existed: loaded "
                          f"with r_gain = 1 for {len(gains)} probe(s) (the old probes had no gain, i.e. gain 1)",
                          stacklevel=2)
        from .saving import read_record

        model.parallax_record = read_record(pretrained_model_name_or_path)
        model.parallax_trained = False
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, parallax_trained: bool | None = None, **kwargs):
        """``save_pretrained`` of the base class, plus ``parallax_model.py`` and, when the model
        carries its conversion record, the manifest and reference (``parallax_trained``: record
        changed non-probe weights as trained; default: whether the model was put in training mode)."""
        self.config.parallax_base_architecture = self.parallax_base_architecture
        self.config.auto_map = {"AutoConfig": f"{CODE_FILE[:-3]}.{type(self.config).__name__}",
                                "AutoModelForCausalLM": f"{CODE_FILE[:-3]}.{type(self).__name__}"}
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        out = Path(save_directory)
        (out / CODE_FILE).write_text(
            f'"""A model converted by parallax-compile (pip install parallax-compile); transformers imports this\n'
            f'file for from_pretrained(..., trust_remote_code=True). The classes live in the package."""\n\n'
            f"from parallax_compile.hf.auto import parallax_classes\n\n"
            f"{type(self.config).__name__}, {type(self).__name__} = parallax_classes({self.parallax_base_architecture!r})\n")
        if self.parallax_record is not None:
            from .saving import write_record

            write_record(self, out, trained=self.parallax_trained if parallax_trained is None else parallax_trained)


class ParallaxConfig:
    """What ``AutoConfig`` finds under ``model_type = "parallax"``: ``from_dict`` returns the config of
    the ``Parallax<Base>`` class named by ``parallax_base_architecture``."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        base = config_dict.get("parallax_base_architecture")
        if not base:
            raise ValueError("a config.json with model_type 'parallax' needs `parallax_base_architecture` "
                             "(e.g. 'LlamaForCausalLM')")
        return parallax_classes(base)[0].from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        import transformers

        config_dict, kwargs = transformers.PreTrainedConfig.get_config_dict(path, **kwargs)
        return cls.from_dict(config_dict, **kwargs)


@functools.cache
def parallax_classes(base_architecture: str) -> tuple[type, type]:
    """``(Parallax<Base>Config, Parallax<Base>)`` for a transformers causal-LM class name, made once
    and registered with ``AutoModelForCausalLM`` (and ``AutoTokenizer``, like the base).
    Raises ``ValueError`` for a name transformers does not have."""
    import transformers

    register()
    base = getattr(transformers, base_architecture, None)
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
        raise ValueError(f"parallax_base_architecture {base_architecture!r} is not a transformers model class")
    base_config = base.config_class
    config_cls = type(f"Parallax{base_config.__name__}", (base_config,),
                      {"model_type": MODEL_TYPE, "__module__": __name__,
                       "register_for_auto_class": classmethod(_no_auto_class)})
    model_cls = type(f"Parallax{base_architecture}", (_ParallaxMixin, base),
                     {"config_class": config_cls, "parallax_base_architecture": base_architecture,
                      "__module__": __name__, "register_for_auto_class": classmethod(_no_auto_class)})
    transformers.AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    try:  # pipelines find the tokenizer of a config class without tokenizer_class through this mapping
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

        if base_config in TOKENIZER_MAPPING:
            TOKENIZER_MAPPING.register(config_cls, TOKENIZER_MAPPING[base_config], exist_ok=True)
    except Exception:  # noqa: BLE001 - optional convenience
        pass
    globals()[config_cls.__name__], globals()[model_cls.__name__] = config_cls, model_cls  # picklable by name
    return config_cls, model_cls


def __getattr__(name: str):
    """``Parallax<Base>`` / ``Parallax<Base>Config`` by name, made on first use: pickle (vLLM sends
    the config to its engine process) finds the classes in a fresh process."""
    import transformers

    if name.startswith("Parallax"):
        base = name[len("Parallax"):]
        if base.endswith("Config"):  # LlamaConfig -> LlamaForCausalLM, Gemma3TextConfig -> Gemma3ForCausalLM
            config_name = base
            stems = (base[:-len("Config")], base[:-len("TextConfig")] if base.endswith("TextConfig") else None)
            base = next((f"{s}ForCausalLM" for s in stems if s and getattr(getattr(
                transformers, f"{s}ForCausalLM", None), "config_class", type).__name__ == config_name), None)
        if base and isinstance(getattr(transformers, base, None), type):
            config_cls, model_cls = parallax_classes(base)
            return config_cls if name.endswith("Config") else model_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def register() -> None:
    """Register ``model_type = "parallax"`` with ``AutoConfig`` and the ``parallax`` attention
    implementation. Idempotent; ``import parallax_compile`` calls it once transformers is imported."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    attention.register()
    CONFIG_MAPPING.register(MODEL_TYPE, ParallaxConfig, exist_ok=True)
    del transformers


def to_parallax(model, record: dict | None = None):
    """Turn an upgraded transformers model (after :func:`~parallax_compile.hf.upgrade.add_probes`)
    into its ``Parallax<Base>`` class in place (same object, same weights); returns it."""
    if isinstance(model, _ParallaxMixin):
        return model
    base = type(model).__name__
    config_cls, model_cls = parallax_classes(base)
    model.config.__class__ = config_cls
    model.config.parallax_base_architecture = base
    model.__class__ = model_cls
    model.parallax_record = record
    model.parallax_trained = False
    return model


def load_pretrained(path, **kwargs):
    """Load a Hugging Face conversion directory: ``AutoModelForCausalLM.from_pretrained(path)`` through
    the ``Parallax<Base>`` class, for directories written before ``model_type = "parallax"`` too (a
    base ``model_type`` with ``parallax_probes``). ``kwargs`` go to ``from_pretrained``.
    Raises ``ValueError`` when ``config.json`` names no probes."""
    path = Path(path)
    config_dict = json.loads((path / "config.json").read_text())
    if not config_dict.get("parallax_probes"):
        raise ValueError(f"{path} is not a Parallax model: its config.json has no `parallax_probes`")
    base = config_dict.get("parallax_base_architecture") or (config_dict.get("architectures") or [""])[0]
    config_cls, model_cls = parallax_classes(base)
    if "config" not in kwargs:
        import transformers

        raw, _ = transformers.PreTrainedConfig.get_config_dict(path)
        raw.pop("model_type", None)
        kwargs["config"] = config_cls.from_dict(raw)
    return model_cls.from_pretrained(path, **kwargs)
