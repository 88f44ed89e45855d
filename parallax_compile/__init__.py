"""parallax-compile: find the attention in a PyTorch model and rewrite it into Parallax form.

Pipeline (one package per step): ``passes.capture`` -> ``passes.match`` -> ``passes.rewrite``
(with ``passes.query_chain``) -> verify (``convert``), then ``saving`` / the exporters.
"""

__version__ = "0.1.0"

import sys

from .compiling import compile_model
from .convert import ConversionInfo, convert, find_attention
from .export import export_mlir, export_onnx
from .decode import parallax_attention_with_kvcache
from .op import parallax_attention
from .passes.site import AttentionSite
from .saving import load, save, verify

if "transformers" in sys.modules:  # register the "parallax" attention implementation (else: parallax_compile.hf)
    from .hf.attention import register as _register_hf

    _register_hf()

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
    "load",
    "parallax_attention",
    "parallax_attention_with_kvcache",
    "save",
    "verify",
]
