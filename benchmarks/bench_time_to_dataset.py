"""Time to dataset: the judge after generation (`--sequential`) versus while it runs
(the default), on the demo workload, in paired rounds.

The demo config (2,304 rollouts in 18 shards) builds its vectors once; each round then
runs the rollouts and judge stages into a copy of that folder, both orders back to back.
The judge is the loopback Batch API (`tests/batch_api_support.py`, the one the tests
use), each batch finishing a fixed time after its creation, one shard per file and two
files in flight (`enqueued_token_budget`: 2.5 files' tokens), so judging alone goes out
in 9 waves; the time per batch is calibrated so that judging alone takes about as long as
generating alone (neither hides the other). The
live-pool variant (`--judge llm`) calls the same server's chat endpoint with a fixed
latency, its concurrency capped, calibrated the same way. Calibration runs the judge
stage alone over a rollouts-only folder (no engine), sets the time per batch or call
latency, measures again and corrects once.

The engine is bound to core 1 (`--engine-cpu`): its worker's threads through
VLLM_CPU_OMP_THREADS_BIND and its EngineCore process, which waits for each step in a busy
loop, by affinity (`_build`), as on a GPU the model runs on a device of its own and its
core process waits on it; the loopback server, which stands for
a remote service, runs on the other core only, ahead of the build's threads (niceness
-5; its turnaround does not depend on this machine's load); the builds' drivers (vLLM's
front end, the judge client) run where the scheduler puts them. Both orders and the
calibration run so. Judging alone is calibrated to the
calibration's generating alone (`--judge-share`, default 1.0: the hardest case).

Times run from the first request submitted (engine start-up, which both orders pay
alike, is left out, as in bench_build). Reported per round: generate alone (the
sequential build's first request to its last rollouts commit), judge alone (its judge
stage), sequential end to end, streaming end to end (to the last labelled shard); and the
ratios
`streaming_over_max` = streaming / max(generate alone, judge alone) (<= 1.15 wanted)
and `sequential_over_streaming` (>= 1.5 wanted), medians of paired rounds.

    python benchmarks/bench_time_to_dataset.py [--pairs 3] [--judge batch|llm|both]
        [--judge-share 0.85] [--engine-cpu 1]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KEY_ENV = "BENCH_JUDGE_KEY"


#: the loopback server's request threads: a remote service's turnaround does not wait
#: for this machine's time slices (at 15, as before, every call waited behind the
#: driver's: the live judge's shards took 10-25% longer while generation ran)
SERVER_NICENESS = -5
#: the core the engine's threads are bound to (`--engine-cpu`): set in `main`
ENGINE_CPU = {"bind": "1"}


def _env(key: str) -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")
    # the engine on a core of its own, as on a GPU it would have a device of its own;
    # the driver, the judge's client and the loopback server share the other core
    env["VLLM_CPU_OMP_THREADS_BIND"] = ENGINE_CPU["bind"]
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env[KEY_ENV] = key
    return env


def _build(*args: str, key: str = "") -> subprocess.CompletedProcess:
    """`asteer-build ARGS`, with the engine's core process kept on the engine's core.

    vLLM on CPU runs its worker in a process of its own (the mp executor), and the
    EngineCore waits for each step's output in a busy loop (shm_broadcast's
    SpinCondition: `sched_yield` for a second after every read). Left where the scheduler
    puts it, that loop takes ~75% of the other core, the one the driver and the judge
    have; on a GPU the engine's core process waits on its own device. So while the build
    runs, every thread of its `VLLM::EngineCore` is bound to the engine's core too, where
    it yields to the worker (`--engine-cpu auto` leaves everything unbound).
    """
    p = subprocess.Popen([str(BIN / "asteer-build"), *args], cwd=ROOT, env=_env(key),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    if ENGINE_CPU["bind"].isdigit():
        threading.Thread(target=_pin_engine_core, args=(p.pid, int(ENGINE_CPU["bind"]), stop),
                         daemon=True).start()
    try:
        out, err = p.communicate()
    finally:
        stop.set()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _pin_engine_core(pid: int, cpu: int, stop: threading.Event) -> None:
    import psutil

    pinned: set[int] = set()
    while not stop.wait(0.2):
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return
        for k in kids:
            try:
                if not k.name().startswith("VLLM::EngineCor"):
                    continue
                for t in k.threads():
                    if t.id not in pinned:
                        os.sched_setaffinity(t.id, {cpu})
                        pinned.add(t.id)
            except (psutil.Error, OSError):
                pass


def _config(tmp: Path, name: str, judge: dict) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["judge"] = judge
    cfg["output"] = str(tmp / "unused")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(cfg: Path, base: Path, out: Path, key: str, *extra: str) -> dict:
    shutil.copytree(base, out)
    t0 = time.time()
    r = _build("run", "--config", str(cfg), "--out", str(out), "--stages", "rollouts,judge",
               "--no-progress", "--json", *extra, key=key)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"build failed:\n{r.stderr[-4000:]}")
    s = json.loads(r.stdout)
    shutil.rmtree(out, ignore_errors=True)
    ro, ju = s["rollouts"], s["judge"]
    last_commit = max(x["ended"] for x in ro["shards"])
    ((t_first, _),) = ro["generate_windows"].values()
    j0, j1 = ju["window"]
    return {"wall_seconds": round(wall, 2), "build_seconds": s["seconds"],
            # from the first request submitted (engine start-up, which both orders pay
            # alike, excluded) to the dataset's last labelled shard
            "end_to_end_seconds": round(j1 - t_first, 2),
            # first request submitted to the last rollouts commit: generating alone
            "rollouts_seconds": round(last_commit - t_first, 2),
            "generate_seconds": ro["generate_seconds"],
            "judge_seconds": round(j1 - j0, 2),
            "judge_after_last_commit_seconds": round(max(0.0, j1 - last_commit), 2),
            "labelled_ok": ju["ok"], "failed": ju["failed"], "pending": ju.get("pending"),
            "batches": (ju.get("batches") or {}).get("batches"), "mode": s["mode"]}


def _judge_alone(cfg: Path, rollouts: Path, out: Path, key: str) -> float:
    """Seconds the judge stage alone takes over a copy of a rollouts-only run folder (no
    engine: what calibrating the judge's latency needs)."""
    shutil.copytree(rollouts, out)
    r = _build("run", "--config", str(cfg), "--out", str(out), "--stages", "judge",
               "--no-progress", "--json", key=key)
    if r.returncode != 0:
        raise SystemExit(f"judge alone failed:\n{r.stderr[-4000:]}")
    shutil.rmtree(out, ignore_errors=True)
    j0, j1 = json.loads(r.stdout)["judge"]["window"]
    return j1 - j0


def _tokens_per_file(run: Path, tmp: Path) -> float:
    """The mean input tokens of one 128-request batch file of this workload, as the
    Batch API stage counts them (so the enqueued-token budget can hold two files)."""
    from asteer_build.pipeline.shards import read_stage
    from judge.batches import BatchStage, requests_for_table
    from judge.cache import JudgmentCache
    from judge.config import BatchSettings
    from judge.rubric import DEFAULT_RUBRIC

    reqs = requests_for_table(read_stage(str(run), "rollouts"), "bench-judge",
                              DEFAULT_RUBRIC.version)
    with JudgmentCache(tmp / "count-cache.jsonl") as cache:
        st = BatchStage(None, tmp / "count-state", cache, model="bench-judge",
                        settings=BatchSettings(max_requests_per_file=128))
        st.add(reqs)
        return statistics.mean(r["tokens"] for r in st.records)


def _judge(kind: str, url: str, budget: int, conc: int) -> dict:
    if kind == "batch":
        return {"kind": "openai-batch", "model": "bench-judge",
                "endpoints": [{"base_url": url, "api_key_env": KEY_ENV}],
                # polls on the benchmark's compressed time scale (batches of seconds,
                # not hours)
                "batch": {"max_requests_per_file": 128, "enqueued_token_budget": budget,
                          "poll_initial_s": 0.1, "poll_max_s": 0.3}}
    return {"kind": "llm", "model": "bench-judge",
            "endpoints": [{"base_url": url, "api_key_env": KEY_ENV, "max_concurrency": conc}],
            "retry": {"max_attempts": 3, "timeout_s": 60}}


def _variant(kind: str, a: argparse.Namespace, tmp: Path, base: Path, rollouts: Path,
             gen_alone: float, file_tokens: float) -> dict:
    from tests.batch_api_support import batch_server

    key = "sk-bench-" + secrets.token_hex(8)
    n_rows, n_files, conc, in_flight = 2304, 18, 8, 2
    # judge alone ~ `judge_share` x generate alone: 18 files, two in flight (9 waves;
    # each batch also waits for its next poll and its labelling, ~0.4 s), or 2,304 calls
    # 8 at a time
    target = a.judge_share * gen_alone
    per_batch = max(0.5, target / (n_files / in_flight) - 0.4)
    latency = target * conc / n_rows
    budget = int(2.5 * file_tokens)  # two files fit, a third does not
    rounds = []
    # the server stands for a remote service: off the engine's core, and its answers
    # not delayed by the build's threads (SERVER_NICENESS)
    rest = (os.sched_getaffinity(0) - {int(a.engine_cpu)}) if a.engine_cpu.isdigit() \
        else None
    with batch_server(key, finish_after_s=per_batch, chat_latency_s=latency,
                      niceness=SERVER_NICENESS, cpus=rest or None) as (srv, url):
        cfg = _config(tmp, kind, _judge(kind, url, budget, conc))
        # Calibrated on the judge stage alone over the calibration's rollouts: the
        # judge's own time (HTTP, parsing, labelling, polls) is not small here, so
        # measure it, set the latency, measure again and correct once.
        if kind == "llm":
            srv.chat_latency_s = 0.0
            j0 = _judge_alone(cfg, rollouts, tmp / "cal", key)
            latency = max(0.0, target - j0) * conc / n_rows
            srv.chat_latency_s = latency
            j1 = _judge_alone(cfg, rollouts, tmp / "cal", key)
            if j1 > j0:
                latency *= max(0.0, target - j0) / (j1 - j0)
            srv.chat_latency_s = latency
            cal = {"judge_alone_at_zero_latency_s": round(j0, 2),
                   "judge_alone_at_first_latency_s": round(j1, 2)}
        else:
            j1 = _judge_alone(cfg, rollouts, tmp / "cal", key)
            per_batch = max(0.5, per_batch + (target - j1) / (n_files / in_flight))
            srv.finish_after_s = per_batch
            cal = {"judge_alone_at_first_batch_time_s": round(j1, 2)}
        cal.update(target_s=round(target, 2), chat_latency_s=round(latency, 4),
                   per_batch_seconds=round(per_batch, 2))
        print(json.dumps({"calibration": kind, **cal}), flush=True)
        for i in range(a.pairs):
            rd = {"sequential": _run(cfg, base, tmp / f"{kind}-s{i}", key, "--sequential"),
                  "streaming": _run(cfg, base, tmp / f"{kind}-t{i}", key)}
            seq, st = rd["sequential"], rd["streaming"]
            gen, jud = seq["rollouts_seconds"], seq["judge_seconds"]
            rd["judge_over_generate"] = round(jud / gen, 3)
            rd["streaming_over_max"] = round(st["end_to_end_seconds"] / max(gen, jud), 3)
            rd["sequential_over_streaming"] = round(
                seq["end_to_end_seconds"] / st["end_to_end_seconds"], 3)
            rounds.append(rd)
            print(json.dumps({"variant": kind, "round": i,
                              **{k: rd[k] for k in ("judge_over_generate",
                                                    "streaming_over_max",
                                                    "sequential_over_streaming")}}),
                  flush=True)
    med = {k: round(statistics.median(r[k] for r in rounds), 3)
           for k in ("judge_over_generate", "streaming_over_max", "sequential_over_streaming")}
    return {"calibration": cal,
            "judge": {"kind": kind, "per_batch_seconds": round(per_batch, 2),
                      "batch_files": n_files, "batches_in_flight": in_flight,
                      "enqueued_token_budget": budget,
                      "mean_tokens_per_file": round(file_tokens),
                      "chat_latency_s": round(latency, 3), "max_concurrency": conc},
            "rounds": rounds, **med,
            "min_max": {k: [min(r[k] for r in rounds), max(r[k] for r in rounds)]
                        for k in med}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--judge", choices=("batch", "llm", "both"), default="both")
    p.add_argument("--judge-share", type=float, default=1.0,
                   help="judging alone, as a share of generating alone (0.8 .. 1.25)")
    p.add_argument("--engine-cpu", default="1",
                   help="VLLM_CPU_OMP_THREADS_BIND for the engine (default: core 1, leaving "
                        "core 0 to the driver and the judge; 'auto': both cores)")
    a = p.parse_args()
    ENGINE_CPU["bind"] = a.engine_cpu
    kinds = ("batch", "llm") if a.judge == "both" else (a.judge,)
    with tempfile.TemporaryDirectory(prefix="bench-ttd-") as d:
        tmp = Path(d)
        base = tmp / "base"
        rules = _config(tmp, "rules", {"kind": "rules"})
        r = _build("run", "--config", str(rules), "--out", str(base), "--stages", "vectors",
                   "--no-progress")
        if r.returncode != 0:
            raise SystemExit(f"vectors failed:\n{r.stderr[-4000:]}")
        # generate alone, to calibrate the judge's latency (not counted)
        out = tmp / "calibrate"
        shutil.copytree(base, out)
        r = _build("run", "--config", str(rules), "--out", str(out), "--stages", "rollouts",
                   "--no-progress", "--json")
        if r.returncode != 0:
            raise SystemExit(f"calibration failed:\n{r.stderr[-4000:]}")
        ro = json.loads(r.stdout)["rollouts"]
        ((t_first, _),) = ro["generate_windows"].values()
        gen_alone = max(x["ended"] for x in ro["shards"]) - t_first
        file_tokens = _tokens_per_file(out, tmp)
        print(json.dumps({"calibration_generate_seconds": round(gen_alone, 2),
                          "mean_tokens_per_file": round(file_tokens)}), flush=True)
        from benchmarks.common import RESULTS

        # a run of one variant keeps the other's last results
        old = RESULTS / "bench_time_to_dataset.json"
        results = json.loads(old.read_text())["variants"] if old.exists() else {}
        for kind in kinds:
            results[kind] = _variant(kind, a, tmp, base, out, gen_alone, file_tokens)
            write("bench_time_to_dataset", {
                "workload": {"config": "configs/demo.yaml", "rows": 2304, "shards": 18,
                             "pairs": a.pairs, "engine_cpu_bind": a.engine_cpu,
                             "calibration_generate_seconds": round(gen_alone, 2)},
                "variants": results,
                "streaming_over_max": {k: v["streaming_over_max"] for k, v in results.items()},
                "sequential_over_streaming": {k: v["sequential_over_streaming"]
                                              for k, v in results.items()},
                "targets": {"streaming_over_max": "<= 1.15",
                            "sequential_over_streaming": ">= 1.5",
                            "judge_over_generate": "0.8 .. 1.25"},
            })


if __name__ == "__main__":
    main()
