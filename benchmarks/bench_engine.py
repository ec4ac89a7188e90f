"""Throughput of per-request steering in vLLM against plain vLLM and the HF-hook reference.

One run, one workload for every system: N chat prompts, exactly T new tokens each
(ignore_eos), temperature 0.7, a per-request seed. Reported: tokens/s of
(a) plain vLLM, (b) the steered engine where every request has its own vector and alpha,
(c) the Hugging Face `generate()` + forward-hook reference at batch 8 and at its best batch
size; and (b) with 1, 8, 64 and 256 distinct configs per batch. Systems are measured in
interleaved rounds and the median round is reported, so drift on a shared machine hits
all of them alike.

    python benchmarks/bench_engine.py [--prompts 256] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hf-batches", default="8,32,64,128,256")
    ap.add_argument("--name", default="bench_engine", help="results/<name>.json")
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    from asteer_build.engine import SteeredEngine, SteerSpec
    from asteer_build.reference import HFReference
    from asteer_build.tinyworld import build_tiny_model

    path = str(build_tiny_model())
    dtype = getattr(torch, args.dtype)
    hf = HFReference(path, dtype=dtype)
    # HF on a CPU can be faster in float32 than in bfloat16; the baseline gets its best.
    hf32 = HFReference(path, dtype=torch.float32) if dtype != torch.float32 else None
    tok = hf.tokenizer
    words = ["ocean", "music", "robot", "coffee", "forest", "rocket", "castle", "garden"]
    questions = [
        f"explain {words[i % 8]} and {words[(i * 3 + 1) % 8]} to a friend in {3 + i % 5} "
        "simple steps" for i in range(args.prompts)
    ]
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False))
        for q in questions
    ]
    n, T = len(prompts), args.tokens
    params = [
        SamplingParams(max_tokens=T, temperature=0.7, seed=1000 + i, ignore_eos=True)
        for i in range(n)
    ]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    g = torch.Generator().manual_seed(0)
    vectors = {f"c{i}": torch.randn(128, generator=g) for i in range(n)}
    hf.register_vectors(vectors)
    if hf32 is not None:
        hf32.register_vectors(vectors)

    def specs(k: int) -> list:
        # k distinct (vector, alpha, layer) configs, round-robin over the batch
        return [SteerSpec(f"c{i % k}", 0.5 + (i % k) / k, 1 + (i % k) % 4) for i in range(n)]

    eargs = dict(dtype=args.dtype, enforce_eager=True, max_model_len=512, max_num_seqs=n,
                 max_num_batched_tokens=8192, seed=0, kv_cache_memory_bytes=2 << 30)

    def tps(fn) -> float:
        t0 = time.perf_counter()
        total = fn()
        return total / (time.perf_counter() - t0)

    def count(outs) -> int:
        got = sum(len(o.outputs[0].token_ids) for o in outs)
        assert got == n * T, got
        return got

    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)
        print(f"  {name}: {value:,.0f} tok/s", flush=True)

    # Both engines stay up and every round measures every system, back to back.
    plain = LLM(path, **eargs)
    eng = SteeredEngine(path, **eargs)
    eng.register_vectors(vectors)
    plain.generate(inputs[:16], params[:16], use_tqdm=False)  # warm-up
    eng.generate(inputs[:16], params[:16], specs(16)[:16])
    hf.generate(prompts[:8], specs(8)[:8], max_new_tokens=4, batch_size=8)
    ks = sorted({1, 8, 64, min(256, n), n})
    s_all = specs(n)
    hf_batches = [int(b) for b in args.hf_batches.split(",")]
    for r in range(args.rounds):
        print(f"round {r}", flush=True)
        # (a) plain vLLM
        record("a_plain_vllm", tps(lambda: count(plain.generate(inputs, params, use_tqdm=False))))
        # (b) steered: every request its own config (k = n), and k distinct configs
        for k in ks:
            s = specs(k)
            record(f"b_steered_k{k}", tps(lambda s=s: count(eng.generate(inputs, params, s))))
        # (c) HF reference with forward hooks
        for tag, ref in (("", hf), ("_fp32", hf32)):
            if ref is None:
                continue
            for b in hf_batches:
                def run(b=b, r=r, ref=ref):
                    out = ref.generate(prompts, s_all, max_new_tokens=T, batch_size=b,
                                       temperature=0.7, seed=r)
                    return sum(len(x) for x in out)
                record(f"c_hf{tag}_batch{b}", tps(run))
    info = eng.info()[0]
    eng.shutdown()
    plain.llm_engine.engine_core.shutdown()

    med = {k: statistics.median(v) for k, v in results.items()}
    a = med["a_plain_vllm"]
    b = med[f"b_steered_k{n}"]
    c8_key = max((k for k in med if k.startswith("c_hf") and k.endswith("_batch8")), key=med.get)
    c8 = med[c8_key]
    best_hf = max((k for k in med if k.startswith("c_hf")), key=med.get)
    payload = {
        "workload": {"prompts": n, "new_tokens": T, "temperature": 0.7, "dtype": args.dtype,
                     "model": "tinyworld llama (hidden 128, 6 layers)", "rounds": args.rounds,
                     "enforce_eager": True, "mean_prompt_tokens":
                     sum(map(len, prompts)) / n},
        "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "tokens_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in results.items()},
        "ratios": {
            "b_over_a": round(b / a, 4),
            "b_over_c_batch8": round(b / c8, 3),
            "hf_batch8_variant": c8_key,
            "b_over_c_best": round(b / med[best_hf], 3),
            "hf_best_batch": best_hf,
            "k256_over_k1": round(med[f"b_steered_k{min(256, n)}"] / med["b_steered_k1"], 4),
        },
        "targets": {"b_over_a": ">= 0.95", "b_over_c_batch8": ">= 4", "k256_over_k1": ">= 0.9"},
        "steering_state": {k: info[k] for k in ("adapter", "capacity", "steer_layers")},
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }
    write(args.name, payload)


if __name__ == "__main__":
    main()
