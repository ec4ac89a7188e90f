"""End-to-end build throughput: local vs Ray (one actor), and cost per item as work grows.

Runs `asteer-build run` on `configs/demo.yaml` (the tiny world) as a user would, each
build in a fresh output folder:

- demo 1x locally and on Ray with one engine actor (a local Ray instance started by the
  driver): end-to-end items/s (wall time of the whole build: vectors, engine start,
  rollouts, judge) and rollout items/s while an engine is up (`generate_seconds`);
  the Ray overhead is the relative loss of the latter (target <= 10%);
- 1x, 4x, 16x the demo's work (more samples per item, same shards size), locally:
  seconds per item with an engine up should stay flat (within 15%).

    python benchmarks/bench_build.py [--scales 1,4,16] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _config(tmp: Path, name: str, samples: int, max_tokens: int | None) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["sampling"]["samples"] = samples
    if max_tokens:
        cfg["sampling"]["max_tokens"] = max_tokens
    cfg["models"][0]["replicas"] = 1
    cfg["output"] = str(tmp / name)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _build(cfg: Path, executor: str) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    r = subprocess.run([str(BIN / "asteer-build"), "run", "--config", str(cfg), "--executor",
                        executor, "--no-progress", "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"build failed ({executor}):\n{r.stderr[-4000:]}")
    s = json.loads(r.stdout)
    ro = s["rollouts"]
    return {
        "executor": executor,
        "items": s["items"],
        "shards": s["shards"],
        "wall_seconds": round(wall, 2),
        "end_to_end_items_per_s": round(s["items"] / wall, 2),
        "generate_seconds": ro["generate_seconds"],
        "generate_items_per_s": round(ro["items_run"] / ro["generate_seconds"], 2),
        "seconds_per_item_ms": round(1000 * ro["generate_seconds"] / ro["items_run"], 3),
        "tokens": ro["tokens"],
        "tokens_per_s": round(ro["tokens"] / ro["generate_seconds"], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", default="1,4,16")
    p.add_argument("--max-tokens", type=int, default=None)
    a = p.parse_args()
    scales = [int(x) for x in a.scales.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-build-") as d:
        tmp = Path(d)
        local = _build(_config(tmp, "local-1x", 1, a.max_tokens), "local")
        print(json.dumps(local), flush=True)
        ray = _build(_config(tmp, "ray-1x", 1, a.max_tokens), "ray")
        print(json.dumps(ray), flush=True)
        scaling = {"1": local}
        for k in scales:
            if k == 1:
                continue
            scaling[str(k)] = _build(_config(tmp, f"local-{k}x", k, a.max_tokens), "local")
            print(json.dumps(scaling[str(k)]), flush=True)
    overhead = 1 - ray["generate_items_per_s"] / local["generate_items_per_s"]
    per_item = [v["seconds_per_item_ms"] for v in scaling.values()]
    spread = max(per_item) / min(per_item) - 1
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    write("bench_build", {
        "workload": {
            "config": "configs/demo.yaml", "items_1x": local["items"],
            "max_tokens": a.max_tokens or demo["sampling"]["max_tokens"],
            "shard_size": demo["shard_size"], "scales": scales,
            "scale_by": "sampling.samples (more distinct items per (concept, prompt, alpha))",
        },
        "local_1x": local,
        "ray_1_actor_1x": ray,
        "scaling_local": scaling,
        "ratios": {
            "ray_overhead_generate": round(overhead, 4),
            "ray_overhead_end_to_end": round(
                1 - ray["end_to_end_items_per_s"] / local["end_to_end_items_per_s"], 4),
            "cost_per_item_spread": round(spread, 4),
        },
        "targets": {"ray_overhead_generate": "<= 0.10", "cost_per_item_spread": "<= 0.15"},
    })


if __name__ == "__main__":
    main()
