"""An ONNX export directory as Optimum writes one (``optimum-cli export onnx --model X out_dir/``):
``model.onnx`` with named inputs, outputs and symbolic dims, the model's ``config.json`` (and
``generation_config.json``) and its tokenizer files beside it, checked in ONNX Runtime.

* A Hugging Face decoder upgraded in place (attention implementation ``parallax``): ``model.onnx``
  takes and returns the KV cache (:mod:`.onnx_decoder`); the check runs the prompt through ONNX
  Runtime against PyTorch (logits) and generates greedily token by token against
  ``model.generate`` (tokens must be equal).
* A causal decoder converted as a graph (nanoGPT, a factory's model) whose graph
  :func:`.graph_decoder.with_kv_cache` proves it can cache exactly: ``model.onnx`` takes and
  returns the KV cache in the same layout (token input under the model's own name, no
  ``attention_mask``); the check generates greedily token by token in ONNX Runtime against PyTorch
  recomputing the whole prefix at each step (tokens equal; logits of every step within the tolerance).
* Any other converted model (an encoder, or a graph the KV cache is refused for, the reason in
  ``kv_cache_note``): ``model.onnx`` without a cache (inputs named as the model's keyword inputs,
  outputs as its output fields: ``logits``, ``last_hidden_state``...); the check compares the
  main output on the example inputs.

The check passes when the max relative error (``max |ort - torch| / max |torch|`` at the
non-padding positions) is at most :data:`ORT_TOLERANCE` for the exported dtype.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checks import main_output, relative_error

__all__ = ["MODEL_FILE", "ORT_TOLERANCE", "OnnxExport", "export_onnx_dir", "is_parallax_decoder"]

MODEL_FILE = "model.onnx"
ORT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2}
"""Max relative error of ONNX Runtime against PyTorch (fp32: a few ulps of matmul reordering over
tens of layers; fp16: weights and activations in half precision)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja")


@dataclass
class OnnxExport:
    """What :func:`export_onnx_dir` wrote and measured."""

    directory: str
    model_file: str
    kv_cache: bool
    inputs: list[str]
    outputs: list[str]
    dims: dict[str, list]
    parallax_nodes: int
    opset: int
    error: float
    tolerance: float
    generated_tokens: int = 0
    tokens_equal: bool | None = None
    files: list[str] = field(default_factory=list)
    kv_cache_note: str | None = None
    """Why a graph conversion got no KV cache (None when it has one, or for other kinds)."""

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance and self.tokens_equal is not False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def is_parallax_decoder(model) -> bool:
    """A transformers causal LM upgraded in place (``config.parallax_probes``), so it generates with
    a KV cache."""
    config = getattr(model, "config", None)
    return (getattr(config, "parallax_probes", None) is not None and getattr(model, "can_generate", bool)()
            and not getattr(config, "is_encoder_decoder", False))


def _write_side_files(out: Path, config, tokenizer_dir) -> list[str]:
    written = []
    if config is not None:
        config.save_pretrained(out)
        written.append("config.json")
    src = Path(tokenizer_dir) if tokenizer_dir else None
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if src is not None and (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
            written.append(name)
    return written


def export_onnx_dir(
    directory: str | Path,
    module,
    inputs: dict[str, Any],
    *,
    source=None,
    example_inputs=None,
    dynamic_shapes: Any = "auto",
    valid: torch.Tensor | None = None,
    tokenizer_dir: str | Path | None = None,
    config=None,
    opset: int | None = None,
    fp16: bool = False,
    accumulate: str = "float",
    new_tokens: int = 8,
) -> OnnxExport:
    """Write ``directory/model.onnx`` (plus config and tokenizer) for ``module`` and check it in
    ONNX Runtime on keyword ``inputs`` (module docstring).

    Args:
        directory: the export directory (created; files of the same names are replaced).
        module: the PyTorch model to check against: a transformers causal LM upgraded in place
            (exported with its KV cache) or a converted module (a causal decoder graph is exported
            with its KV cache when that is exact; see the module docstring).
        inputs: keyword inputs to check on (``input_ids`` / ``attention_mask`` for decoders).
        source, example_inputs, dynamic_shapes: what :func:`.onnx.export_onnx` exports when it is
            not ``module`` itself (e.g. the ``ExportedProgram`` of a saved ``model.pt2``).
        valid: bool ``[B, L]`` of the positions to compare (default: where ``attention_mask``
            is 1, when there is one).
        tokenizer_dir: a directory whose tokenizer files are copied beside the model.
        config: the transformers config to write as ``config.json`` (default: ``module.config``).
        new_tokens: greedy tokens generated by both runtimes (decoders).

    Raises ``ValueError`` for a path ending in ``.onnx`` (a directory is expected).
    """
    import onnx

    from .graph_decoder import NoKVCache, export_graph_decoder_onnx, recompute_greedy, with_kv_cache
    from .onnx import export_onnx, parallax_nodes, run_onnx
    from .onnx_decoder import export_decoder_onnx, ort_greedy
    from .ort_kernel import session as make_session

    out = Path(directory)
    if out.suffix == ".onnx":
        raise ValueError(f"{out}: expected a directory (model.onnx is written inside it, as Optimum does), "
                         f"e.g. {out.with_suffix('')}/")
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    decoder = is_parallax_decoder(module)
    graph, note = None, None
    if not decoder and isinstance(module, torch.fx.GraphModule):
        try:
            graph = with_kv_cache(module)
        except NoKVCache as why:
            note = str(why)
    if decoder:
        export_decoder_onnx(module, path, opset=opset, fp16=fp16, accumulate=accumulate)
    elif graph is not None:
        export_graph_decoder_onnx(graph, path, opset=opset, fp16=fp16, accumulate=accumulate)
    else:
        export_onnx(module if source is None else source, example_inputs, path, dynamic_shapes=dynamic_shapes,
                    opset=opset, fp16=fp16, accumulate=accumulate)
    files = [MODEL_FILE] + _write_side_files(out, config or getattr(module, "config", None), tokenizer_dir)
    proto = onnx.load(str(path), load_external_data=False)
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in [*proto.graph.input, *proto.graph.output]}
    mask = inputs.get("attention_mask")
    if valid is None and isinstance(mask, torch.Tensor) and not bool(mask.all()):
        valid = mask.bool()
    report = OnnxExport(
        directory=str(out), model_file=str(path), kv_cache=decoder or graph is not None, kv_cache_note=note,
        inputs=[i.name for i in proto.graph.input],
        outputs=[o.name for o in proto.graph.output], dims=dims, parallax_nodes=len(parallax_nodes(proto)),
        opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), error=float("nan"),
        tolerance=ORT_TOLERANCE["float16" if fp16 else "float32"], files=files)
    session = make_session(path, fast_path=False)
    if graph is not None:
        prompt, steps = inputs[graph.token_input], []
        tokens, _ = ort_greedy(session, prompt.cpu(), None, new_tokens, step_logits=steps)
        expected, want = recompute_greedy(module, graph.token_input, prompt, new_tokens)
        report.generated_tokens = tokens.shape[1] - prompt.shape[1]
        report.tokens_equal = torch.equal(tokens, expected)
        report.error = max(relative_error(a, b) for a, b in zip(steps, want))
        return report
    with torch.no_grad():
        want = main_output(module(**inputs))
    if decoder:
        gen = module.generation_config
        prompt, prompt_mask = inputs["input_ids"], inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        tokens, got = ort_greedy(session, prompt.cpu(), prompt_mask.cpu(), new_tokens,
                                 eos_token_id=_first(gen.eos_token_id), pad_token_id=gen.pad_token_id)
        with torch.no_grad():
            expected = module.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=new_tokens,
                                       do_sample=False)
        report.generated_tokens = tokens.shape[1] - prompt.shape[1]
        report.tokens_equal = tokens.shape == expected.shape and torch.equal(tokens, expected.cpu())
    else:
        got = torch.from_numpy(run_onnx(path, inputs, session=session)[0])
    report.error = relative_error(got.float(), want.float().cpu(), None if valid is None else valid.cpu())
    return report


def _first(token_id):
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id
