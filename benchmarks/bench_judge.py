"""Judgments/s of the judge pool against a plain concurrent OpenAI client, same server.

The pool adds dispatch, health tracking, retries and parsing on top of the client; this
measures what that costs when nothing fails. Both sides send identical requests (the
rubric, structured output, temperature 0, `--max-tokens`) to one local `vllm serve` of
the tiny model, at the same concurrency: the plain side is `AsyncOpenAI` under an
`asyncio.Semaphore`, the pool side is `LLMJudge` over an `EndpointPool` whose endpoint
limit is that concurrency. Each round uses fresh rows (no prefix-cache advantage for the
second runner), sides alternate which goes first, and each round yields a paired ratio
(pool / plain, measured back to back). The median paired ratio is the headline: on a
shared machine whose load drifts between rounds, pairing cancels most of the drift that
would otherwise swamp a comparison of two medians.

    python benchmarks/bench_judge.py [--rounds 5] [--base-url URL --model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.common import write  # noqa: E402
from judge.judges import LLMJudge  # noqa: E402
from judge.pool import EndpointConfig, EndpointPool  # noqa: E402
from judge.rubric import build_messages, parse_judgment, response_format  # noqa: E402

CONCURRENCY = [1, 4, 16, 32]


def _n_for(c: int) -> int:
    return max(48, 8 * c)


async def plain(url: str, model: str, rows: list[dict], c: int, max_tokens: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=120)
    sem = asyncio.Semaphore(c)
    ok = 0

    async def one(r: dict) -> None:
        nonlocal ok
        async with sem:
            resp = await client.chat.completions.create(
                model=model,
                messages=build_messages(r["prompt"], r["concept"], r["response"]),
                response_format=response_format(),
                max_tokens=max_tokens,
                temperature=0.0,
            )
        parse_judgment(resp.choices[0].message.content)
        ok += 1

    t = time.perf_counter()
    await asyncio.gather(*(one(r) for r in rows))
    dt = time.perf_counter() - t
    await client.close()
    assert ok == len(rows)
    return len(rows) / dt


async def pooled(url: str, model: str, rows: list[dict], c: int, max_tokens: int) -> float:
    from judge.shards import _run_calls

    async with EndpointPool([EndpointConfig(url, max_concurrency=c)], model=model) as pool:
        judge = LLMJudge(pool, model, max_tokens=max_tokens)
        items = {str(i): (r["prompt"], r["concept"], r["response"]) for i, r in enumerate(rows)}
        results: dict = {}
        t = time.perf_counter()
        # The same bounded-worker driver `judge.shards` uses, at 2x the pool's capacity.
        await _run_calls(judge, items, 2 * c, lambda k, o: results.__setitem__(k, o))
        dt = time.perf_counter() - t
    assert all(o.status == "ok" for o in results.values()), [
        o.error for o in results.values() if o.status != "ok"
    ][:3]
    return len(rows) / dt


def main() -> None:
    from judge_support import make_rows, served_model, vllm_server

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--base-url", help="use a running server instead of starting one")
    ap.add_argument("--model")
    args = ap.parse_args()

    if args.base_url:
        ctx = nullcontext(args.base_url)
    else:
        from asteer_build.inputs.tinyworld import build_tiny_model

        log = Path(tempfile.gettempdir()) / "asteer-bench-judge-serve.log"
        ctx = vllm_server(str(build_tiny_model()), log, max_num_seqs=32)
    with ctx as url:
        model = args.model or served_model(url)
        seed = 1000
        warm = make_rows(32, seed=seed)
        asyncio.run(plain(url, model, warm, 32, args.max_tokens))
        table = []
        for c in CONCURRENCY:
            p_runs, q_runs = [], []
            for r in range(args.rounds):
                seed += 2
                a, b = make_rows(_n_for(c), seed=seed), make_rows(_n_for(c), seed=seed + 1)
                if r % 2 == 0:
                    p_runs.append(asyncio.run(plain(url, model, a, c, args.max_tokens)))
                    q_runs.append(asyncio.run(pooled(url, model, b, c, args.max_tokens)))
                else:
                    q_runs.append(asyncio.run(pooled(url, model, a, c, args.max_tokens)))
                    p_runs.append(asyncio.run(plain(url, model, b, c, args.max_tokens)))
            p, q = statistics.median(p_runs), statistics.median(q_runs)
            ratios = [b / a for a, b in zip(p_runs, q_runs, strict=True)]
            table.append(
                {
                    "concurrency": c,
                    "requests_per_round": _n_for(c),
                    "plain_judgments_per_s": round(p, 2),
                    "pool_judgments_per_s": round(q, 2),
                    "ratio": round(statistics.median(ratios), 3),
                    "paired_ratios": [round(x, 3) for x in ratios],
                    "plain_rounds": [round(x, 2) for x in p_runs],
                    "pool_rounds": [round(x, 2) for x in q_runs],
                }
            )
            print(json.dumps(table[-1]), flush=True)
    top = table[-1]
    write(
        "bench_judge",
        {
            "workload": {
                "server": "vllm serve, tiny world model, CPU",
                "max_tokens": args.max_tokens,
                "temperature": 0.0,
                "structured_output": True,
                "rounds": args.rounds,
                "statistic": "median round; ratio = median of paired round ratios",
            },
            "headline": {
                "concurrency": top["concurrency"],
                "pool_judgments_per_s": top["pool_judgments_per_s"],
                "plain_judgments_per_s": top["plain_judgments_per_s"],
                "ratio": top["ratio"],
                "target_ratio": 0.9,
                "min_ratio_any_concurrency": min(r["ratio"] for r in table),
            },
            "by_concurrency": table,
        },
    )


if __name__ == "__main__":
    main()
