"""`asteer-build run`: the stages vectors -> rollouts -> judge over one run folder.

Every stage reads committed shards of the stage before it and commits its own; this
module decides what is left to do (from the manifest), refuses a run folder whose items
would change, and hands the engine work to the executor the options name
(`executors.get_executor`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..core.console import console
from ..core.paths import cache_dir
from .config import BuildConfig, ModelConfig, check_output
from .depth import check_layer
from .executors import Executor, OnCommit, ShardRecord, get_executor
from .judge_stage import StreamingJudge, check_cost_cap, judge_stage, streams
from .plan import make_plan, shard_name
from .run import STAGE_ORDER, Run, RunOptions, pending_shards
from .sampling import require_resolved
from .shards import Manifest, ShardFile, Store, open_store

__all__ = ["RunOptions", "BuildRefused", "prepare_run", "execute_run", "run_build",
           "build_status", "log_file", "summary_text", "STAGE_ORDER", "SUMMARY"]

log = logging.getLogger("asteer_build")

_ROLLOUT_SETS = ("rollouts", "features", "activations")
#: the last run's full summary, in the run folder (stdout gets it only with `--json`)
SUMMARY = "summary.json"


class BuildRefused(RuntimeError):
    """The run folder belongs to a different plan; nothing was touched."""


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    new = json.loads(json.dumps(new, sort_keys=True, default=str))
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def _sampling_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Why the effective sampling differs, per model and key, with both values and their
    sources (a changed generation_config.json leaves the config itself unchanged)."""
    if old is None:
        return ["effective sampling (not recorded there: a build from before asteer "
                "recorded it; now " + "; ".join(
                    f"{n} top_k {e['top_k']}, top_p {e['top_p']}" for n, e in new.items())
                + ")"]
    out = []
    for name, e in new.items():
        o = old.get(name)
        if o is None:
            continue  # a new model: the config diff names it
        for k in ("temperature", "top_k", "top_p"):
            if o.get(k) != e[k]:
                out.append(f"sampling of {name}: {k} {o.get(k)} "
                           f"({o.get('source', {}).get(k)}) there, {e[k]} "
                           f"({e['source'][k]}) now")
    return out


def prepare_run(cfg: BuildConfig, opts: RunOptions) -> Run:
    """Check everything that can fail before an engine starts, then open the manifest."""
    bad = [s for s in opts.stages if s not in STAGE_ORDER]
    if bad:
        raise ValueError(f"--stages: unknown stage(s) {bad} (known: {', '.join(STAGE_ORDER)})")
    try:
        get_executor(opts.executor)
    except ValueError as e:
        raise ValueError(f"--executor: {e}") from None
    for name, d in check_layer(cfg).items():
        if d["num_hidden_layers"] is None:
            console.say(f"layer: not checked against {name}'s depth here ({d['unchecked']}); "
                        "the engine checks it when it starts")
    where = "--out" if opts.out else "output"
    # Relative outputs are relative to the working directory, like --out (sources are
    # relative to the config file: they travel with it; outputs do not).
    location = opts.out or cfg.output
    uri = check_output(location, where)
    plan = make_plan(cfg)
    # Never sample with values we could not determine (offline, uncached model file).
    require_resolved(plan.sampling)
    sampling = {n: e.as_dict() for n, e in plan.sampling.items()}
    for i in opts.rerun_shards:
        if not 0 <= i < len(plan.shards):
            raise ValueError(f"--rerun-shards: shard {i} does not exist (plan has "
                             f"{len(plan.shards)} shards, 0..{len(plan.shards) - 1})")
    store = open_store(uri)
    manifest = Manifest.load(store)
    if manifest is None:
        manifest = Manifest.create(store, config=cfg.as_dict(), config_hash=cfg.config_hash(),
                                   plan_hash=plan.plan_hash, n_items=plan.n_items,
                                   n_shards=len(plan.shards), sampling=sampling,
                                   prompt_format=cfg.prompt_format.as_dict())
    elif manifest.data["plan_hash"] != plan.plan_hash:
        changed = _config_diff(manifest.data.get("config", {}), cfg.as_dict())
        changed += _sampling_diff(manifest.data.get("sampling"), sampling)
        raise BuildRefused(
            f"refusing to build into {store.uri}: it holds a build whose items differ from "
            f"this config's (plan {manifest.data['plan_hash']} there, {plan.plan_hash} now; "
            f"changed: {', '.join(changed) or 'concept or prompt files'}). Restore the "
            "config (or the model's generation_config.json), or give a new output location "
            "(--out DIR or `output:`)."
        )
    elif manifest.data["config_hash"] != cfg.config_hash():
        # Same items, different settings that do not change them (judge, engine args,
        # executor options): keep going, and remember the new config.
        hist = manifest.data.setdefault("config_history", [])
        hist.append({"config_hash": manifest.data["config_hash"],
                     "config": manifest.data["config"]})
        manifest.data["config"], manifest.data["config_hash"] = cfg.as_dict(), cfg.config_hash()
        manifest.save()
    if manifest.data.get("prompt_format") is None:
        # what `train` and `suggest` read back; a run folder made without the record
        # rendered with the default, which the plan hash then confirms
        manifest.data["prompt_format"] = cfg.prompt_format.as_dict()
        manifest.save()
    if plan.sources and manifest.data.get("sources") != plan.sources:
        # Where concepts and prompts came from: a Hub file's resolved commit, so a build
        # names the exact data it was made from (publish copies it into build.json).
        manifest.data["sources"] = plan.sources
        manifest.save()
    removed = store.clean_temps()
    if removed:
        log.info("removed %d temp file(s) left by an interrupted writer", removed)
    if opts.rerun_shards:
        names = [shard_name(i) for i in opts.rerun_shards]
        for stage in (*_ROLLOUT_SETS, "labelled"):
            manifest.forget(stage, names)
    run = Run(cfg, plan, store, manifest, opts)
    check_cost_cap(run)
    return run


def vector_settings_for(cfg: BuildConfig, m: ModelConfig) -> Any:
    """The vectors stage's settings for model `m`: with `vectors.engine_args` unset, the
    pooling engine is the model's own (its `engine_args` and tensor parallelism), not the
    tiny CPU engine's defaults, so a real model pools on its GPU settings."""
    import dataclasses

    from .work import engine_kwargs

    s = cfg.vectors
    if s.engine_args is None:
        s = dataclasses.replace(s, engine_args=engine_kwargs(m))
    return s


def _vectors_stage(run: Run, executor: Executor) -> None:
    """Per model: build the vector files where the executor pools, store them, and record
    one manifest entry."""
    for m in run.cfg.models:
        if run.manifest.is_committed("vectors", m.name):
            continue
        t0 = time.time()
        console.say(f"vectors: {m.name}: building {', '.join(run.cfg.methods)} (starts an "
                    "engine)")
        built = executor.vector_files(m, vector_settings_for(run.cfg, m))
        files = [run.store.put_file("vectors", f"{m.name}/{name}", f"vectors/{m.name}/{name}",
                                    data, len(run.plan.concepts))
                 for name, data in sorted(built.items())]
        # One entry per model; its files ride along, so the entry names them all.
        entry = files[-1]
        run.manifest.record([ShardFile("vectors", m.name, f"vectors/{m.name}", entry.rows,
                                       entry.sha256, sum(f.bytes for f in files))],
                            parts={f.path: f.sha256 for f in files})
        console.say(f"vectors: {m.name}: {len(run.plan.concepts)} concepts x "
                    f"{', '.join(run.cfg.methods)} in {time.time() - t0:.1f}s")


def _rollouts_stage(run: Run, executor: Executor, on_shard: OnCommit | None) -> dict[str, Any]:
    missing = [m.name for m in run.cfg.models if not run.manifest.is_committed("vectors", m.name)]
    if missing:
        raise RuntimeError(f"rollouts: no committed vectors for {missing}; run the vectors "
                           "stage first")
    todo = pending_shards(run)
    if not todo:
        return {"shards_run": 0, "items_run": 0}
    console.say(f"rollouts: {len(todo)} of {len(run.plan.shards)} shards to run "
                f"({sum(len(s.items) for s in todo):,} items, {executor.name} executor)")

    def committed(rec: ShardRecord) -> None:
        log.info("rollouts: %s committed: %d rows on %s pid %s%s, attempt %d, %.1fs",
                 rec.shard, rec.rows, rec.host, rec.pid,
                 f" ({rec.actor})" if rec.actor else "", rec.attempts,
                 rec.ended - rec.started)
        if on_shard is not None:
            on_shard(rec)

    return executor.run_rollouts(todo, committed)


def run_build(cfg: BuildConfig, opts: RunOptions) -> dict[str, Any]:
    return execute_run(prepare_run(cfg, opts))


def execute_run(run: Run, on_shard: OnCommit | None = None) -> dict[str, Any]:
    """The stages of a prepared run; the summary is also written to `summary.json` in the
    run folder (the CLI prints it on stdout only with `--json`). `on_shard` is called with
    each rollouts shard's `ShardRecord` as soon as the manifest holds it (on the
    committing thread), for a caller that acts on shards while the stage still runs."""
    opts = run.opts
    t0 = time.time()
    summary: dict[str, Any] = {"run": run.store.uri, "plan_hash": run.plan.plan_hash,
                               "items": run.plan.n_items, "shards": len(run.plan.shards)}
    executor = get_executor(opts.executor)(run)
    # The judge labels shards as they commit (judge_stage.StreamingJudge) unless the run
    # is sequential, has one stage, or its judge needs the engines' GPUs.
    overlap, why = streams(run, executor)
    stream = StreamingJudge(run) if overlap else None
    if why is not None:
        console.say(f"judge: {why}: it judges after generation")
    subscribers = [f for f in (on_shard, stream and stream.on_commit) if f is not None]

    def committed(rec: ShardRecord) -> None:
        for f in subscribers:
            f(rec)

    try:
        if "vectors" in opts.stages:
            _vectors_stage(run, executor)
        if stream is not None:
            stream.start()
        if "rollouts" in opts.stages:
            summary["rollouts"] = _rollouts_stage(run, executor, committed)
    finally:
        executor.close()  # before a sequential judge, which may start engines of its own
        try:
            # stopped (Ctrl-C, SIGTERM): leave the judge, whose commits are atomic, rather
            # than wait for it to label what it has (Batch API waves can take hours)
            stopping = isinstance(sys.exc_info()[1], KeyboardInterrupt | SystemExit)
            if stream is not None and not stopping and \
                    (judged := stream.finish()) is not None:
                summary["judge"] = judged
        finally:
            _compact(run)
    if "judge" in opts.stages and stream is None:
        try:
            summary["judge"] = judge_stage(run)
        finally:
            _compact(run)
    summary["mode"] = "streaming" if stream is not None else "sequential"
    # Writers killed mid-commit (a lost Ray actor) leave dot-named temp files; no writer
    # is alive now, so they can go.
    run.store.clean_temps()
    summary["seconds"] = round(time.time() - t0, 2)
    # the driver's own writes (with the local executor: every shard): on an object store
    # `seconds` is what uploading one file after another would cost
    summary["store_writes"] = {**run.store.writes,
                               "seconds": round(run.store.writes["seconds"], 2)}
    summary["status"] = build_status(run.store)
    run.store.write_bytes_atomic(SUMMARY, (json.dumps(summary, indent=1, default=str) + "\n")
                                 .encode())
    return summary


def _compact(run: Run) -> None:
    """build.json takes in the stage's journal (`shards.Manifest`), once per stage; a
    stage that failed keeps its own error (the journal holds the commits anyway)."""
    failing = sys.exc_info()[0] is not None
    try:
        run.manifest.compact()
    except Exception as e:
        if not failing:
            raise
        log.warning("could not compact %s after a failed stage: %s", run.store.uri, e)


def log_file(run: Run) -> Path:
    """Where a quiet `asteer-build run` sends every engine, Ray and library log line:
    `logs/build.log` in the run folder, or a local file under the cache for a remote
    run folder (the CLI copies it there at the end)."""
    if run.store.local:
        return Path(run.store.path("logs/build.log"))
    root = cache_dir()
    return root / "logs" / run.plan.plan_hash / "build.log"


def summary_text(summary: dict[str, Any]) -> str:
    """The few lines `asteer-build run` ends with (the full summary is `summary.json`)."""
    st = summary["status"]["stages"]
    lines = [f"run {summary['run']}: {summary['items']:,} items in {summary['shards']} shards, "
             f"{summary['seconds']:.1f}s"]
    ro = summary.get("rollouts")
    if ro is not None:
        extra = f", {ro['tokens']:,} tokens" if "tokens" in ro else ""
        lines.append(f"  rollouts: {ro['shards_run']} shard(s) run now ({ro['items_run']:,} "
                     f"items{extra}); {st['rollouts']['shards_done']}/"
                     f"{st['rollouts']['shards_total']} done")
    ju = summary.get("judge")
    if ju is not None:
        lab = st.get("labelled", {})
        lines.append(f"  judge: {ju['shards_judged']} shard(s) labelled now; "
                     f"{lab.get('shards_done', 0)}/{summary['shards']} done, "
                     f"{lab.get('ok', 0):,} ok, {lab.get('failed', 0):,} failed")
    lines.append(f"  summary: {summary['run']}/{SUMMARY}")
    return "\n".join(lines)


def build_status(run: str | Store) -> dict[str, Any]:
    """Progress per stage from the manifest alone (cheap on a remote store)."""
    store = run if isinstance(run, Store) else open_store(run)
    m = Manifest.load(store)
    if m is None:
        raise FileNotFoundError(f"{store.uri}: not a run folder (no build.json)")
    n_shards, n_items = m.data["shards"], m.data["items"]
    models = [x["name"] for x in m.data["config"]["models"]]
    out: dict[str, Any] = {"run": store.uri, "plan_hash": m.data["plan_hash"],
                           "items": n_items, "shards": n_shards, "stages": {}}
    out["stages"]["vectors"] = {"done": len(m.entries("vectors")), "total": len(models)}
    for stage in ("rollouts", "features", "activations", "labelled"):
        ents = m.entries(stage)
        if not ents and stage in ("features", "activations"):
            continue
        st = {"shards_done": len(ents), "shards_total": n_shards,
              "rows": sum(e["rows"] for e in ents.values())}
        if stage == "labelled":
            st["ok"] = sum(e.get("ok", 0) for e in ents.values())
            st["failed"] = sum(e.get("failed", 0) for e in ents.values())
        out["stages"][stage] = st
    return out
