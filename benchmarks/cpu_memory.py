"""Peak extra memory (and time) of the Parallax forward on the CPU: the chunked op versus a naive
implementation that materialises the full ``[B, H, L, L]`` scores.

* ``parallax``: :func:`parallax_compile.parallax_attention` (the portable chunked implementation:
  at most ``chunk x Lk`` scores per (batch, head) alive, SPEC section 3 computed chunk-wise);
* ``naive``: the float64-oracle formulas run in fp32,
  ``o = effective_weights_ref(q, r, k) @ v`` (logits, softmax, probe scores and the effective
  weights ``A = s (1 + c - g)``, each a full ``[B, H, L, L]`` tensor);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (softmax only, no probe): a
  reference point for what a fused CPU kernel costs.

Each measurement runs in a fresh subprocess. The worker allocates the inputs, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``; if that is not writable it falls back to
``ru_maxrss``), runs one forward and reports ``VmHWM - RSS after the inputs``: the output and
every temporary are counted, the inputs are not. The naive implementation needs about
``B*H*L*L*4`` bytes per live score tensor (8 GiB at L=16384), so by default it runs at
L=4096 and 8192 only; ``--naive-full`` adds L=16384 (under an address-space limit so that it
fails with an allocation error instead of invoking the OOM killer).

Usage::

    python benchmarks/cpu_memory.py                 # B=1 H=8 L=16384 D=64 fp32, naive at 4k/8k
    python benchmarks/cpu_memory.py --naive-full    # also try naive at L=16384
    python benchmarks/cpu_memory.py --seq-len 4096 --naive-seq-lens 1024 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MIB = 2**20
GIB = 2**30
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "cpu_memory.json"


# --- helpers shared by parent and worker ----------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _meminfo_kib(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is None:  # not Linux: ru_maxrss is the best we have
        return _maxrss_bytes()
    return kib * 1024


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Returns False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def naive_score_tensor_bytes(b: int, h: int, l: int, itemsize: int = 4) -> int:
    """Bytes of one materialised ``[B, H, L, L]`` score tensor."""
    return b * h * l * l * itemsize


# --- worker: one implementation, one shape, one fresh process ------------------------------------


def _worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("mem_limit_bytes"):
        resource.setrlimit(resource.RLIMIT_AS, (spec["mem_limit_bytes"], spec["mem_limit_bytes"]))

    from parallax_compile import parallax_attention
    from parallax_compile.reference import effective_weights_ref

    impl, b, h, l, d = spec["impl"], spec["batch"], spec["heads"], spec["seq_len"], spec["head_dim"]
    dtype = getattr(torch, spec["dtype"])
    causal = spec["causal"]

    def naive(q, r, k, v):
        return effective_weights_ref(q, r, k, causal=causal) @ v

    def parallax(q, r, k, v):
        return parallax_attention(q, r, k, v, causal=causal)

    def sdpa(q, r, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    fn = {"naive": naive, "parallax": parallax, "sdpa": sdpa}[impl]

    # warm up the code paths (and their one-off allocations) on a tiny problem
    with torch.no_grad():
        small = [torch.randn(1, 2, 64, d, dtype=dtype) for _ in range(4)]
        fn(*small)
        del small

    torch.manual_seed(0)
    q = torch.randn(b, h, l, d, dtype=dtype)
    r = torch.randn(b, h, l, d, dtype=dtype) * d**-0.5
    k = torch.randn(b, h, l, d, dtype=dtype)
    v = torch.randn(b, h, l, d, dtype=dtype)
    input_bytes = sum(t.numel() * t.element_size() for t in (q, r, k, v))

    base = _rss_bytes()
    method = "VmHWM after clear_refs" if _reset_peak() else "ru_maxrss"
    if method == "ru_maxrss":
        base = _maxrss_bytes()  # the peak so far; only growth beyond it is visible
    times = []
    status = "ok"
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = fn(q, r, k, v)
            times.append(time.perf_counter() - t0)
    except (RuntimeError, MemoryError) as e:  # RLIMIT_AS hit
        status = f"out of memory ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        out = None
    peak = (_proc_status_kib("VmHWM") * 1024) if method.startswith("VmHWM") else _maxrss_bytes()
    finite = bool(torch.isfinite(out).all()) if out is not None else None
    del out
    if status == "ok":
        with torch.no_grad():
            for _ in range(spec["repeats"] - 1):
                t0 = time.perf_counter()
                fn(q, r, k, v)
                times.append(time.perf_counter() - t0)
    return {
        "status": status,
        "peak_extra_bytes": peak - base,
        "input_bytes": input_bytes,
        "rss_after_inputs_bytes": base,
        "measurement": method,
        "times_s": times,
        "output_finite": finite,
        "threads": torch.get_num_threads(),
    }


def _run_in_subprocess(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        why = "killed (likely OOM)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return {"status": f"failed: {why} {tail[0][:160]}".strip()}
    return json.loads(lines[-1])


# --- parent: correctness gate, runs, table, JSON -----------------------------------------------------


def _machine_info() -> dict:
    import torch

    mem = _meminfo_kib("MemTotal")
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_total_gib": round(mem / 2**20, 2) if mem else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # other processes on the machine inflate the times (not the memory): check this first
        "load_average_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _correctness_gate(head_dim: int, causal: bool) -> float:
    """Relative RMS error of the op against the naive fp32 formulas at a small size (must be tiny:
    no benchmark numbers for an implementation that does not compute the same thing)."""
    import torch

    from parallax_compile import parallax_attention
    from parallax_compile.reference import effective_weights_ref

    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 300, head_dim) for _ in range(3))
    r = torch.randn(1, 2, 300, head_dim) * head_dim**-0.5
    ref = effective_weights_ref(*(t.double() for t in (q, r, k)), causal=causal) @ v.double()
    out = parallax_attention(q, r, k, v, causal=causal)
    return float((out.double() - ref).norm() / ref.norm())


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=16384, help="L for the Parallax op (and SDPA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--causal", action="store_true", help="causal attention (default: non-causal)")
    parser.add_argument(
        "--naive-seq-lens",
        type=int,
        nargs="+",
        default=[4096, 8192],
        help="L values for the naive implementation",
    )
    parser.add_argument(
        "--naive-full",
        action="store_true",
        help="also run naive at --seq-len (needs > 8 GiB per score tensor at 16k)",
    )
    parser.add_argument(
        "--parallax-seq-lens",
        type=int,
        nargs="*",
        default=None,
        help="extra L values for the Parallax op (default: the naive ones, for a like-for-like column)",
    )
    parser.add_argument("--no-sdpa", action="store_true", help="skip the softmax SDPA reference point")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed forward calls per measurement (the first also measures memory)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in the workers (default: torch's default)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument(
        "--mem-limit-gib",
        type=float,
        default=None,
        help="address-space limit for the naive workers (default: 90%% of MemAvailable), so that an "
        "oversized run fails with an allocation error instead of the OOM killer",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    import torch

    machine = _machine_info()
    print("# Parallax CPU memory benchmark")
    for key, value in machine.items():
        print(f"#   {key}: {value}")

    err = _correctness_gate(args.head_dim, args.causal)
    print(f"# correctness gate (L=300, rel. RMS vs float64 formulas): {err:.2e}")
    if not err < 1e-5:
        print("correctness gate failed: not benchmarking", file=sys.stderr)
        return 1

    avail = _meminfo_kib("MemAvailable")
    limit = (
        int(args.mem_limit_gib * GIB) if args.mem_limit_gib else (int(avail * 1024 * 0.9) if avail else None)
    )

    base = dict(
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        causal=args.causal,
        repeats=args.repeats,
        threads=args.threads,
    )
    naive_lens = sorted(set(args.naive_seq_lens + ([args.seq_len] if args.naive_full else [])))
    plx_lens = sorted(
        set((naive_lens if args.parallax_seq_lens is None else args.parallax_seq_lens) + [args.seq_len])
    )
    plan = [("parallax", l) for l in plx_lens] + [("naive", l) for l in naive_lens]
    if not args.no_sdpa:
        plan.append(("sdpa", args.seq_len))

    itemsize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    rows = []
    for impl, l in plan:
        spec = dict(base, impl=impl, seq_len=l, mem_limit_bytes=limit if impl == "naive" else None)
        print(f"running {impl:8s} L={l} ...", flush=True)
        res = _run_in_subprocess(spec, args.timeout)
        row = {
            "impl": impl,
            "seq_len": l,
            **res,
            "score_tensor_bytes": naive_score_tensor_bytes(args.batch, args.heads, l, itemsize),
        }
        rows.append(row)

    analytic = {
        "score_tensor_bytes_at_seq_len": naive_score_tensor_bytes(
            args.batch, args.heads, args.seq_len, itemsize
        ),
        "formula": "B*H*L*L*itemsize bytes per materialised [B, H, L, L] score tensor",
        "chunked_score_block_bytes": __import__(
            "parallax_compile.kernels.chunked", fromlist=["x"]
        ).SCORE_BLOCK_BYTES,
    }
    # measured naive peak per score tensor, extrapolated to --seq-len
    ratios = [
        r["peak_extra_bytes"] / r["score_tensor_bytes"]
        for r in rows
        if r["impl"] == "naive" and r.get("status") == "ok"
    ]
    if ratios:
        analytic["naive_peak_in_score_tensors"] = round(max(ratios), 2)
        analytic["naive_extrapolated_peak_bytes_at_seq_len"] = int(
            max(ratios) * analytic["score_tensor_bytes_at_seq_len"]
        )

    print()
    header = f"{'impl':9s} {'L':>6s} {'peak extra':>12s} {'[B,H,L,L] tensor':>17s} {'time (s)':>10s}  status"
    print(header)
    print("-" * len(header))
    for r in rows:
        t = f"{min(r['times_s']):.2f}" if r.get("times_s") else "-"
        peak = _fmt_bytes(r.get("peak_extra_bytes"))
        if r.get("status") != "ok" and r.get("peak_extra_bytes") is not None:
            peak = ">" + peak  # the peak reached before the failure
        print(
            f"{r['impl']:9s} {r['seq_len']:6d} {peak:>12s} "
            f"{_fmt_bytes(r['score_tensor_bytes']):>17s} {t:>10s}  {r['status']}"
        )
    if not args.naive_full:
        tensor = _fmt_bytes(analytic["score_tensor_bytes_at_seq_len"])
        line = f"naive     {args.seq_len:6d} {'not run':>12s} {tensor:>17s}"
        if "naive_extrapolated_peak_bytes_at_seq_len" in analytic:
            line += (
                f"  (analytic: {analytic['naive_peak_in_score_tensors']} score tensors x "
                f"{_fmt_bytes(analytic['score_tensor_bytes_at_seq_len'])} = "
                f"{_fmt_bytes(analytic['naive_extrapolated_peak_bytes_at_seq_len'])})"
            )
        print(line)

    if hasattr(os, "getloadavg"):
        machine["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    result = {
        "benchmark": "cpu_memory",
        "machine": machine,
        "config": dict(
            base,
            seq_len=args.seq_len,
            naive_seq_lens=naive_lens,
            naive_full=args.naive_full,
            naive_mem_limit_bytes=limit,
        ),
        "correctness_rel_rms": err,
        "results": rows,
        "analytic": analytic,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
