"""parallax-compile: find the attention in a PyTorch model and rewrite it into Parallax form.

Pipeline: match -> rewrite -> lower -> export.

* match / rewrite: ``passes`` (``capture`` -> ``match``, ``lla``, ``parallax_pattern`` ->
  ``query_chain`` -> ``rewrite``), verified by ``convert`` (graph models) or ``hf.upgrade``
  (Hugging Face models stay transformers models); ``calibrate`` fits LLA probes;
* lower: the one op (``op``, float64 oracle in ``reference``) with its kernels (``kernels``:
  portable ``chunked``, Triton ``triton_parallax`` and ``triton_decode``), ``decode`` (KV cache) and
  the ``torch.compile`` backend (``backend``, ``compiling``);
* save / load: ``saving`` (one conversion directory for every kind; its manifest and safe writing
  in ``conversion_dir``); export: ``export`` (ONNX with a custom-domain node, torch-mlir).
"""

__version__ = "0.1.0"

from .compiling import compile_model
from .convert import ConversionInfo, convert, find_attention
from .export import export_mlir, export_onnx
from .decode import parallax_attention_with_kvcache
from .op import parallax_attention
from .passes.site import AttentionSite
from .post_import import when_imported
from .probes import is_probe, named_probe_parameters, probe_parameters
from .saving import load, save, verify


def _register_hf() -> None:
    from .hf.auto import register

    register()


# Once transformers is imported (now or later): the "parallax" attention implementation and
# model_type "parallax" (converted models load through AutoModelForCausalLM.from_pretrained).
when_imported("transformers", _register_hf)

# ``parallax_compile.compile`` (convert + torch.compile with the parallax backend); the function
# is defined as ``compile_model`` so no module of the package shadows the builtin ``compile``.
compile = compile_model  # noqa: A001

__all__ = [
    "AttentionSite",
    "ConversionInfo",
    "compile",
    "compile_model",
    "convert",
    "export_mlir",
    "export_onnx",
    "find_attention",
    "is_probe",
    "load",
    "named_probe_parameters",
    "parallax_attention",
    "parallax_attention_with_kvcache",
    "probe_parameters",
    "save",
    "verify",
]
