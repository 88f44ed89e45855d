"""Optional ONNX Runtime kernel for ``ai.parallax::ParallaxAttention`` (the "fast path" of issue 6).

When ``onnxruntime-extensions`` is installed (it is not a dependency), :func:`session` with
``fast_path=True`` (or ``None``: whenever installed) registers a Python custom op
(``onnxruntime_extensions.onnx_op``) for the node that runs the PyTorch op
(``torch.ops.parallax.attention``: the chunked CPU kernel, which accumulates fp32 in fp64), and ONNX
Runtime then uses that kernel instead of inlining the model-local function.

Measured on MiniLM (``benchmarks/ort_latency.py``) this Python kernel is several times *slower*
than the inlined function body (a Python callback per node, numpy/torch hand-offs, fp64
accumulation), so it is off by default: it shows the mechanism a runtime with a native kernel
would use, it is not a speed-up. A native C++ custom-op library is not built.
"""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["fast_path_available", "session"]


@functools.cache
def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError:
        return None
    return onnxruntime_extensions


def fast_path_available() -> bool:
    """Whether ``onnxruntime-extensions`` is importable (then :func:`session` can use the kernel)."""
    return _extensions() is not None


@functools.cache
def _register() -> str:
    """Register the Python kernel once per process; returns the extensions' library path."""
    import numpy as np
    import torch

    from . import onnx_function as spec

    ortx = _extensions()
    dt = ortx.PyCustomOpDef

    @ortx.onnx_op(op_type=f"{spec.DOMAIN}::{spec.OP_TYPE}", inputs=[dt.dt_float] * 5, outputs=[dt.dt_float] * 4,
                  attrs={"scale": dt.dt_float, "causal": dt.dt_int64, "window_size": dt.dt_int64})
    def parallax_attention_kernel(q, r, k, v, attn_mask, **attrs):
        t = lambda x: torch.as_tensor(np.ascontiguousarray(x))
        window = int(attrs.get("window_size", 0)) or None
        with torch.no_grad():
            out = torch.ops.parallax.attention(t(q), t(r), t(k), t(v), t(attn_mask), float(attrs["scale"]),
                                               bool(attrs.get("causal", 0)), window)
        return tuple(o.numpy() for o in out)

    return ortx.get_library_path()


def _is_float(path: Path) -> bool:
    import onnx

    from .onnx import _attention_type

    proto = onnx.load(str(path), load_external_data=False)
    return _attention_type(proto) == onnx.TensorProto.FLOAT


def session(path: str | Path, *, fast_path: bool | None = False, options=None):
    """An ``onnxruntime.InferenceSession`` (CPU) for an exported file. ``fast_path``: False
    (default) runs the function body; True registers the kernel (``ImportError`` without
    onnxruntime-extensions); None uses it whenever onnxruntime-extensions is installed and the
    model's Parallax nodes are float (the kernel is declared for float)."""
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    if fast_path is None:
        fast_path = fast_path_available() and _is_float(Path(path))
    if fast_path:
        if not fast_path_available():
            raise ImportError("session: fast_path=True needs onnxruntime-extensions (pip install onnxruntime-extensions)")
        options.register_custom_ops_library(_register())
        # ORT's spinning worker threads compete with torch's inside the callback (1.7x slower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
