"""Build throughput on the long-tail workload: local and Ray (one actor) versus the ideal.

The tiny world (`configs/demo.yaml`, fewer alphas so a round fits in minutes) with the
reference workload's shape: per-request lengths from `common.long_tail_lengths` (mean
~55% of the cap, ~15% at the cap), `ignore_eos` with per-request `max_tokens`, through
the builder's benchmark-only hook (`bench_lengths` in `asteer_build.core.testseam`). Throughput
counts useful tokens only (each response's own length).

Variants, run interleaved in each round (paired ratios, median with min and max):
- ideal: every request submitted at once to one in-process engine, no shards, no files
  (this process; the engine stays up across rounds), capture off and on;
- local: `asteer-build run --stages rollouts` on a copy of a folder whose vectors are
  built (engine start-up excluded: the generate phase is first request submitted to
  last rollout finished, as the build summary reports it), capture off and on;
- ray: the same with `--executor ray` and one engine actor, capture off.

The CPU time of every process of each build is sampled (psutil), over the whole build
and inside its generate phase (the summary's `generate_windows`), and split into the
driver (with the local executor also vLLM's front end), the engine actor (Ray: vLLM's
front end and the feeding thread), vLLM's engine core and workers, and the Ray runtime (GCS,
raylet, dashboard, idle workers): they all share this machine's two cores with the engine.

Ratios: local / ideal (capture off: the pipeline efficiency without capture), ray /
local, local-capture / ideal-capture (pipeline efficiency with capture on).

    python benchmarks/bench_build.py [--pairs 3] [--cap 256] [--alphas 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from asteer_build.core.testseam import seam_env  # noqa: E402
from benchmarks.common import long_tail_lengths, paired_summary, write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _config(tmp: Path, name: str, cap: int, alphas: int, capture: bool) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for m, vals in cfg["alphas"].items():
        cfg["alphas"][m] = vals[::max(1, len(vals) // alphas)][:alphas]
    cfg["sampling"]["max_tokens"] = cap
    cfg["models"][0]["replicas"] = 1
    # a fresh local Ray instance, never a cluster another process left running here
    cfg.setdefault("ray", {})["address"] = "local"
    if not capture:
        cfg.pop("capture", None)
    cfg["output"] = str(tmp / "unused")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class _CpuSampler:
    """CPU seconds of a process tree, by role, over the whole build and over a window (the
    generate phase), from timestamped samples every 0.2 s (a process that exits between
    samples loses at most its last 0.2 s).

    A process's role comes from every title it showed: a Ray worker starts as
    `default_worker`/`ray::IDLE` and becomes `ray::EngineHost` when the actor lands on it,
    and vLLM's engine core renames itself after it starts, so the role is decided at the
    end, not at first sight."""

    FRONTEND = ("EngineHost",)  # the Ray actor: vLLM's front end and our feeding thread
    ENGINE = ("EngineCore", "VLLM")  # vLLM's engine core and its workers
    RAY = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "ray::",
           "default_worker", "runtime_env")

    def __init__(self, root_pid: int) -> None:
        self.root = root_pid
        self.series: dict[int, list[tuple[float, float]]] = {}
        self.titles: dict[int, set[str]] = {}
        self.parent: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                root = psutil.Process(self.root)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            now = time.time()
            for p in procs:
                try:
                    t = p.cpu_times()
                    self.titles.setdefault(p.pid, set()).add(
                        f"{p.name()} {' '.join(p.cmdline())}")
                    self.series.setdefault(p.pid, []).append((now, t.user + t.system))
                    self.parent.setdefault(p.pid, p.ppid())
                except Exception:
                    pass
            time.sleep(0.2)

    def _role(self, pid: int) -> str:
        """By title, or by ancestry for vLLM's processes: a process under the engine actor
        or the driver that is not Ray's is the engine (its title is not always set:
        setproctitle under Ray's `SPT_NOENV` keeps the spawn command line)."""
        if pid == self.root:
            return "driver"
        seen = " ".join(self.titles.get(pid, ()))
        if any(k in seen for k in self.FRONTEND):
            return "engine_actor"
        if any(k in seen for k in self.ENGINE):
            return "engine_core"
        if "multiprocessing.spawn" in seen and self._under_engine(pid):
            return "engine_core"
        return "ray_runtime" if any(k in seen for k in self.RAY) else "other"

    def _under_engine(self, pid: int) -> bool:
        seen: set[int] = set()
        while pid in self.parent and pid not in seen:
            seen.add(pid)
            pid = self.parent[pid]
            if pid == self.root or any(k in " ".join(self.titles.get(pid, ()))
                                       for k in self.FRONTEND):
                return True
        return False

    @staticmethod
    def _at(series: list[tuple[float, float]], t: float) -> float:
        """Cumulative CPU at time t: the last sample at or before t (0 before the first:
        a process first seen inside the window started there)."""
        last = 0.0
        for ts, cpu in series:
            if ts > t:
                break
            last = cpu
        return last

    def result(self, window: tuple[float, float] | None = None) -> dict[str, dict[str, float]]:
        self.stop.set()
        self.thread.join(timeout=5)
        total: dict[str, float] = {}
        inside: dict[str, float] = {}
        for pid, series in self.series.items():
            role = self._role(pid)
            total[role] = round(total.get(role, 0.0) + series[-1][1], 2)
            if window is not None:
                sec = self._at(series, window[1]) - self._at(series, window[0])
                inside[role] = round(inside.get(role, 0.0) + sec, 2)
        return {"build": total, "generate_phase": inside}


def _build(cfg: Path, base: Path, out: Path | str, executor: str, lengths: Path,
           env_extra: dict[str, str] | None = None) -> dict:
    """One build of the rollouts stage into `out`: a local folder (a copy of `base`) or a
    store URI the caller filled with `base` already."""
    if isinstance(out, Path):
        shutil.copytree(base, out)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.update(seam_env(bench_lengths=str(lengths)))
    env.update(env_extra or {})
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    p = subprocess.Popen([str(BIN / "asteer-build"), "run", "--config", str(cfg), "--out",
                          str(out), "--executor", executor, "--stages", "rollouts",
                          "--no-progress", "--json"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = _CpuSampler(p.pid)
    stdout, stderr = p.communicate()
    wall = time.time() - t0
    if p.returncode != 0:
        sampler.result()
        raise SystemExit(f"build failed ({executor}):\n{stderr[-4000:]}")
    summary = json.loads(stdout)
    ro = summary["rollouts"]
    (window,) = ro["generate_windows"].values()
    cpu = sampler.result(tuple(window))
    if isinstance(out, Path):
        shutil.rmtree(out, ignore_errors=True)
    return {"executor": executor, "wall_seconds": round(wall, 2),
            "generate_seconds": ro["generate_seconds"], "tokens": ro["tokens"],
            "items": ro["items_run"],
            "tok_s": round(ro["tokens"] / ro["generate_seconds"], 1),
            "writer_wait_seconds": ro.get("writer_wait_seconds"),
            "engine_start_seconds": ro.get("engine_start_seconds"),
            "store_writes": summary.get("store_writes"),
            "cpu_seconds_by_role": cpu["build"],
            "cpu_seconds_in_generate_by_role": cpu["generate_phase"]}


def _ideal_requests(cfg_path: Path, base: Path):
    from asteer_build.pipeline.config import load_config
    from asteer_build.pipeline.plan import make_plan
    from asteer_build.pipeline.shards import open_store
    from asteer_build.pipeline.work import model_context, shard_requests

    cfg = load_config(str(cfg_path))
    plan = make_plan(cfg)
    m = cfg.models[0]
    ctx = model_context(open_store(str(base)), cfg, m, plan.prompts, plan.sampling[m.name])
    reqs = [r for s in plan.shards for r in shard_requests(cfg, ctx, s)]
    return cfg, ctx, reqs, cfg.capture


def _ideal(engine, reqs, capture) -> dict:
    from asteer_build.pipeline.rollouts import run_rollouts

    t0 = time.time()
    res = run_rollouts(engine, reqs, capture)
    dt = time.time() - t0
    tokens = sum(r.response_tokens for r in res)
    return {"generate_seconds": round(dt, 2), "tokens": tokens, "tok_s": round(tokens / dt, 1)}


def _prepare(tmp: Path, a: argparse.Namespace):
    """Both configs, the long-tail lengths and a run folder with the vectors built."""
    from asteer_build.pipeline.config import load_config
    from asteer_build.pipeline.plan import make_plan

    cfg_off = _config(tmp, "off", a.cap, a.alphas, capture=False)
    cfg_on = _config(tmp, "on", a.cap, a.alphas, capture=True)
    plan = make_plan(load_config(str(cfg_off)))
    ids = [it.id for it in plan.items()]
    lens = long_tail_lengths(len(ids), a.cap, a.seed)
    lengths = tmp / "lengths.json"
    lengths.write_text(json.dumps(dict(zip(ids, lens, strict=True))))
    os.environ.update(seam_env(bench_lengths=str(lengths)))  # the ideal's requests too
    base = tmp / "base"
    t = time.time()
    r = subprocess.run([str(BIN / "asteer-build"), "run", "--config", str(cfg_off),
                        "--out", str(base), "--stages", "vectors", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"))
    if r.returncode != 0:
        raise SystemExit(f"vectors failed:\n{r.stderr[-4000:]}")
    print(f"vectors in {time.time() - t:.0f}s", flush=True)
    return cfg_off, cfg_on, plan, ids, lens, lengths, base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--cap", type=int, default=256)
    p.add_argument("--alphas", type=int, default=4, help="alphas per method (of 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--s3", action="store_true",
                   help="the S3 variant (bench_build_s3.py): output on a loopback S3 API "
                        "behind a slow link versus a local folder")
    p.add_argument("--upload-share", type=float, default=0.15,
                   help="--s3: the link's bandwidth is set so that uploading the build's "
                        "files one after another takes this share of the generate phase")
    p.add_argument("--latency-ms", type=float, default=5.0, help="--s3: per-chunk latency")
    a = p.parse_args()
    from asteer_build.engine import SteeredEngine
    from asteer_build.pipeline.work import engine_kwargs

    if a.s3:
        from benchmarks.bench_build_s3 import s3_main

        s3_main(a)
        return
    with tempfile.TemporaryDirectory(prefix="bench-build-") as d:
        tmp = Path(d)
        cfg_off, cfg_on, plan, ids, lens, lengths, base = _prepare(tmp, a)
        cfg, ctx, reqs, _ = _ideal_requests(cfg_off, base)
        _, _, reqs_on, capture = _ideal_requests(cfg_on, base)
        engine = SteeredEngine(ctx.path, steer_layers=[cfg.layer],
                               **engine_kwargs(cfg.models[0]))
        engine.register_vectors(ctx.vectors)
        _ideal(engine, reqs[:64], None)  # warm-up
        rounds: list[dict] = []

        def report() -> None:
            """Written after every round, so a cut-short run still leaves its pairs."""

            def col(k: str) -> list[float]:
                return [rd[k]["tok_s"] for rd in rounds]

            ray_cpu = [rd["ray"]["cpu_seconds_by_role"] for rd in rounds]
            gen_cpu = {k: [rd[k]["cpu_seconds_in_generate_by_role"] for rd in rounds]
                       for k in ("local", "ray", "local_capture")}
            write("bench_build", {
                "workload": {
                    "config": "configs/demo.yaml", "alphas_per_method": a.alphas,
                    "items": len(ids), "shard_size": len(plan.shards[0].items),
                    "shards": len(plan.shards), "cap": a.cap, "seed": a.seed,
                    "lengths": {"mean": round(sum(lens) / len(lens), 1),
                                "at_cap": round(sum(x == a.cap for x in lens) / len(lens), 3),
                                "useful_tokens": sum(lens)},
                    "ignore_eos": True, "pairs": len(rounds), "pairs_planned": a.pairs,
                    "max_num_seqs": cfg.models[0].engine_args.get("max_num_seqs"),
                    "throughput": "useful tokens / generate phase (first request submitted to "
                                  "last rollout finished, engine start-up excluded)",
                },
                "rounds": rounds,
                "ratios": {
                    "local_over_ideal": paired_summary(col("ideal"), col("local")),
                    "ray_over_local_generate": paired_summary(col("local"), col("ray")),
                    "pipeline_efficiency_capture_off": paired_summary(col("ideal"), col("local")),
                    "pipeline_efficiency_capture_on": paired_summary(col("ideal_capture"),
                                                                     col("local_capture")),
                    "capture_on_over_plain_engine": paired_summary(col("ideal"),
                                                                   col("local_capture")),
                },
                "ray_cpu_seconds_by_role": ray_cpu,
                # the same split inside each build's generate phase (2 cores: at most
                # 2 x generate_seconds in all): what competes with the engine while it runs
                "cpu_seconds_in_generate_by_role": gen_cpu,
                "targets": {"local_over_ideal": ">= 0.95", "ray_over_local_generate": ">= 0.90",
                            "pipeline_efficiency_capture_on": ">= 0.85"},
            })

        try:
            for i in range(a.pairs):
                rd = {"ideal": _ideal(engine, reqs, None)}
                rd["local"] = _build(cfg_off, base, tmp / f"l{i}", "local", lengths)
                rd["ray"] = _build(cfg_off, base, tmp / f"r{i}", "ray", lengths)
                rd["ideal_capture"] = _ideal(engine, reqs_on, capture)
                rd["local_capture"] = _build(cfg_on, base, tmp / f"c{i}", "local", lengths)
                rounds.append(rd)
                report()
                print(json.dumps({"round": i, **{k: v["tok_s"] for k, v in rd.items()}}),
                      flush=True)
        finally:
            engine.shutdown()


if __name__ == "__main__":
    main()
