"""`asteer-judge`: label shards, compare judges, and move batch files.

    asteer-judge run --config judge.yaml --in rollouts/ [--out labelled/] [--rerun-failed]
    asteer-judge run --rules --in rollouts/             # the tiny world's rules judge
    asteer-judge sample --in rollouts/ --out sample/ --n 600 [--stratify concept_level,alpha]
    asteer-judge agree --a labelled/ --b strong/ [--sample-csv review.csv --sample-n 600]
    asteer-judge batch-write --config judge.yaml --in rollouts/ --requests req.jsonl
    asteer-judge batch-read --config judge.yaml --in rollouts/ --results out.jsonl
    asteer-judge batch-submit  --config judge.yaml --in rollouts/ [--out DIR] [--yes]
    asteer-judge batch-status  --config judge.yaml --in rollouts/ [--out DIR]
    asteer-judge batch-collect --config judge.yaml --in rollouts/ [--out DIR] [--wait]
    asteer-judge batch-cancel  --config judge.yaml --in rollouts/ [--out DIR]

The `batch-*` commands drive the Batch API (`judge.batches`); their state lives in
`--batch-dir` (default `<out>/.batches`), so any of them can be rerun after a kill.

`run` opens the config's `judge.kind` through `judge.kinds`, as the build does: `rules`,
`llm` (the endpoints), `openai-batch` (the Batch API stage run to the end, its state in
`--batch-dir` like the batch-* commands, then the labels); `vllm` servers are started
only by `asteer-build`. An unknown kind is refused, naming the kinds.

Every subcommand prints one JSON summary on stdout; logs go to stderr, with API keys
masked. Exit status 0 means the command ran; failed rows are reported, not fatal,
except with `--strict`, which exits 3 when any row is failed or pending. Bad input (a
config field, a kind, a missing file) exits 2 with one line naming it; a Batch API
submission beyond `judge.batch.cost_cap_usd` without `--yes` exits 4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from judge.config import JudgeConfig, load_config
from judge.secrets import install_log_redaction

__all__ = ["main"]

log = logging.getLogger("judge")


def _config(args: argparse.Namespace) -> JudgeConfig:
    cfg = load_config(args.config) if args.config else JudgeConfig()
    if getattr(args, "model", None):
        cfg.model = args.model
    if getattr(args, "rules", False):
        cfg.kind = "rules"
    return cfg


def _rubric(args: argparse.Namespace, cfg: JudgeConfig):
    """The config's rubric; a relative `rubric_file` is relative to the config file."""
    return cfg.rubric(Path(args.config).parent if args.config else ".")


def _cache_path(args: argparse.Namespace, cfg: JudgeConfig) -> Path:
    if args.cache:
        return Path(args.cache)
    if cfg.cache:
        return Path(cfg.cache)
    return Path(args.out or args.inp) / ".judge-cache.jsonl"


def _shard_requests(args: argparse.Namespace, cfg: JudgeConfig, rubric_version: str) -> list:
    """The calls labelling `--in` would make: rows still to judge, read from `--out` where
    a shard was written there already (a resumed run)."""
    import pyarrow.parquet as pq

    from judge.batches import requests_for_table
    from judge.shards import list_shards

    reqs = []
    for shard in list_shards(args.inp):
        done = Path(args.out) / shard.name if args.out else shard
        t = pq.read_table(done if done.exists() else shard)
        reqs += requests_for_table(t, cfg.model, rubric_version, rerun_failed=args.rerun_failed)
    return reqs


async def _run(args: argparse.Namespace) -> dict:
    """Any kind through the one registry (`judge.kinds`); `openai-batch` runs the Batch
    API stage to the end (its state in `--batch-dir`, shared with the batch-* commands),
    then labels from its answers."""
    from judge.batches import CostCapExceeded
    from judge.cache import JudgmentCache
    from judge.kinds import JudgeContext, open_judge
    from judge.shards import judge_shards

    cfg = _config(args)
    rubric = _rubric(args, cfg)
    out: dict = {}
    ctx = JudgeContext(rubric=rubric, batch_dir=_batch_dir(args, cfg, rubric.version),
                       requests=lambda: _shard_requests(args, cfg, rubric.version),
                       rerun_failed=args.rerun_failed, yes=args.yes)
    lifetime = open_judge(cfg, ctx)  # a bad kind fails here, before any file is written
    with JudgmentCache(_cache_path(args, cfg)) as cache:
        ctx.cache = cache
        try:
            async with lifetime as session:
                reports = await judge_shards(args.inp, args.out, session.judge, cache,
                                             rerun_failed=args.rerun_failed,
                                             workers=session.workers)
                out = {"shards": [asdict(r) for r in reports], "endpoints": session.stats(),
                       **session.info}
        except CostCapExceeded as e:
            log.error("%s", e)
            args.exit_code = 4
            return {"shards": [], "refused": str(e)}
    return out


def _summary_counts(summary: dict) -> tuple[int, int]:
    shards = summary.get("shards", [])
    return (sum(s["failed"] for s in shards), sum(s["pending"] for s in shards))


def cmd_run(args: argparse.Namespace) -> dict:
    return asyncio.run(_run(args))


def cmd_agree(args: argparse.Namespace) -> dict:
    import pyarrow as pa

    from judge.agreement import compare, load_labels, stratified_sample, write_sample_csv

    a = load_labels(args.a, args.col_a)
    b = load_labels(args.b or args.a, args.col_b)
    rep = compare(a, b, args.col_a, args.col_b)
    out = rep.as_dict()
    if args.sample_csv:
        b_by_id = dict(
            zip(b.column("id").to_pylist(), b.column(args.col_b).to_pylist(), strict=True)
        )
        rows = a.to_pylist()
        for r in rows:
            r["_a"], r["_b"] = r.get(args.col_a), b_by_id.get(r["id"])
        sample = stratified_sample(
            pa.Table.from_pylist(rows), args.sample_n, strata=("_a", "_b"), seed=args.seed
        )
        write_sample_csv(sample, args.sample_csv, col_a="_a", col_b="_b")
        out["sample_csv"], out["sample_rows"] = str(args.sample_csv), len(sample)
    return out


def cmd_sample(args: argparse.Namespace) -> dict:
    """A stratified sample of a shard directory, as one shard with no judgments, for
    two judges to label before `agree` compares them (README: judge agreement)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from judge.agreement import load_labels, stratified_sample
    from judge.label import JUDGE_COLUMNS

    if args.n < 1:
        raise ValueError(f"--n: expected a positive number of rows (got {args.n})")
    t = load_labels(args.inp, "id")
    strata = tuple(s.strip() for s in args.stratify.split(",") if s.strip())
    missing = [s for s in strata if s not in t.column_names]
    if missing:
        raise ValueError(f"--stratify: no column(s) {missing} in {args.inp} "
                         f"(columns: {', '.join(t.column_names)})")
    t = t.drop_columns([c for c in JUDGE_COLUMNS if c in t.column_names])
    rows = stratified_sample(t, args.n, strata=strata, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), out / "sample.parquet")
    counts: dict[str, int] = {}
    for r in rows:
        k = "/".join(str(r.get(s)) for s in strata)
        counts[k] = counts.get(k, 0) + 1
    return {"sample": str(out / "sample.parquet"), "rows": len(rows), "of": t.num_rows,
            "strata": list(strata), "per_stratum": counts}


def cmd_batch_write(args: argparse.Namespace) -> dict:
    from judge.batchfile import write_requests
    from judge.cache import JudgmentCache

    cfg = _config(args)
    with JudgmentCache(_cache_path(args, cfg)) as cache:
        paths = write_requests(
            args.inp,
            args.requests,
            model=cfg.model,
            cache=cache,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            structured=cfg.structured,
            rerun_failed=args.rerun_failed,
            out_dir=args.out,
            rubric=_rubric(args, cfg),
        )
    return {
        "request_files": [str(p) for p in paths],
        "requests": sum(sum(1 for _ in open(p)) for p in paths),
    }


def cmd_batch_read(args: argparse.Namespace) -> dict:
    from judge.batchfile import read_results
    from judge.cache import JudgmentCache
    from judge.judges import LLMJudge
    from judge.shards import judge_shards

    cfg = _config(args)
    rubric = _rubric(args, cfg)
    with JudgmentCache(_cache_path(args, cfg)) as cache:
        failures, counts = read_results(args.results, cache, model=cfg.model, rubric=rubric)
        # The judge object only names the model and rubric here: cache-only mode
        # never calls it.
        judge = LLMJudge(pool=None, judge_model=cfg.model,  # type: ignore[arg-type]
                         rubric=rubric)
        reports = asyncio.run(
            judge_shards(
                args.inp,
                args.out,
                judge,
                cache,
                rerun_failed=args.rerun_failed,
                cache_only=True,
                external_failures=failures,
            )
        )
    return {"results": counts, "shards": [asdict(r) for r in reports]}


def _batch_dir(args: argparse.Namespace, cfg: JudgeConfig, rubric_version: str) -> Path:
    from judge.batches import state_dir_for

    if args.batch_dir:
        return Path(args.batch_dir)
    return state_dir_for(Path(args.out or args.inp) / ".batches", cfg.model, rubric_version)


def _batch_cmd(args: argparse.Namespace) -> dict:
    """batch-submit / -status / -collect / -cancel over one state folder."""
    from judge.batches import BatchStage, CostCapExceeded, FailuresJudge
    from judge.cache import JudgmentCache
    from judge.shards import judge_shards

    cfg = _config(args)
    if cfg.kind != "openai-batch":
        raise ValueError(f"judge.kind is {cfg.kind!r}; the batch-* commands need openai-batch")
    rubric = _rubric(args, cfg)
    if getattr(args, "poll_s", None) is not None:
        from dataclasses import replace

        cfg.batch = replace(cfg.batch, poll_initial_s=args.poll_s,
                            poll_max_s=max(args.poll_s, 4 * args.poll_s))
    with JudgmentCache(_cache_path(args, cfg)) as cache:
        stage = BatchStage.from_config(cfg, _batch_dir(args, cfg, rubric.version), cache,
                                       rubric)
        out: dict = {}
        try:
            if args.cmd in ("batch-submit", "batch-collect"):
                out["queued_now"] = stage.add(_shard_requests(args, cfg, rubric.version),
                                              rerun_failed=args.rerun_failed)
            if args.cmd == "batch-submit":
                out["submitted"] = stage.submit(yes=args.yes)
            elif args.cmd == "batch-status":
                stage.poll()
            elif args.cmd == "batch-cancel":
                out["cancelled"] = stage.cancel()
            elif args.cmd == "batch-collect":
                if args.wait:
                    stage.run(yes=args.yes, max_wait_s=args.max_wait_s)
                else:
                    stage.poll()
                    stage.collect()
                    out["submitted"] = stage.submit(yes=args.yes)
                judge = FailuresJudge(cfg.model, rubric.version, stage.failures)
                reports = asyncio.run(judge_shards(args.inp, args.out, judge, cache,
                                                   rerun_failed=True, workers=1))
                out["shards"] = [asdict(r) for r in reports]
        except CostCapExceeded as e:
            log.error("%s", e)
            out["refused"] = str(e)
            args.exit_code = 4
        out.update(stage.summary())
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asteer-judge", description=__doc__.split("\n")[0])
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)

    def shard_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML with a judge: section")
        sp.add_argument("--in", dest="inp", required=True, help="shard directory")
        sp.add_argument("--out", help="output directory (default: rewrite --in)")
        sp.add_argument("--cache", help="cache file (default: config, else <out>/.judge-cache)")
        sp.add_argument("--model", help="override the judge model name")
        sp.add_argument(
            "--rerun-failed", action="store_true", help="retry rows whose judge_status is failed"
        )
        sp.add_argument(
            "--strict", action="store_true", help="exit 3 if any row ends failed or pending"
        )

    r = sub.add_parser("run", help="judge a shard directory")
    shard_args(r)
    r.add_argument("--rules", action="store_true", help="use the tiny world's rules judge")
    r.add_argument("--batch-dir", help="kind openai-batch: batch state folder (default "
                   "<out>/.batches/<model>-<rubric version>, as the batch-* commands)")
    r.add_argument("--yes", action="store_true", help="kind openai-batch: submit beyond "
                   "judge.batch.cost_cap_usd")
    r.set_defaults(func=cmd_run)

    a = sub.add_parser("agree", help="Cohen's kappa and confusion matrix of two judges")
    a.add_argument("--a", required=True)
    a.add_argument("--b", help="second judge's shards (default: --a, with --col-b)")
    a.add_argument("--col-a", default="label")
    a.add_argument("--col-b", default="label")
    a.add_argument("--sample-csv", help="write a stratified sample for human review")
    a.add_argument("--sample-n", type=int, default=600)
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=cmd_agree)

    s = sub.add_parser("sample", help="a stratified sample of shards, unlabelled, to judge twice")
    s.add_argument("--in", dest="inp", required=True, help="shard directory (or one file)")
    s.add_argument("--out", required=True, help="directory for sample.parquet")
    s.add_argument("--n", type=int, default=600, help="rows in the sample")
    s.add_argument("--stratify", default="concept_level,alpha",
                   help="comma-separated columns whose value combinations share the sample")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    w = sub.add_parser("batch-write", help="write OpenAI Batch API request JSONL")
    shard_args(w)
    w.add_argument("--requests", required=True, help="output .jsonl path")
    w.set_defaults(func=cmd_batch_write)

    b = sub.add_parser("batch-read", help="label shards from Batch API result JSONL")
    shard_args(b)
    b.add_argument("--results", required=True, nargs="+", help="result .jsonl file(s)")
    b.set_defaults(func=cmd_batch_read)

    for name, text in (("batch-submit", "queue rows still to judge and submit Batch API "
                        "batches (waves, cost cap)"),
                       ("batch-status", "poll the submitted batches and print their states"),
                       ("batch-collect", "download finished batches, resubmit failed lines, "
                        "label the shards (--wait: until every line is done)"),
                       ("batch-cancel", "cancel the batches in flight")):
        sp = sub.add_parser(name, help=text)
        shard_args(sp)
        sp.add_argument("--batch-dir", help="batch state folder (default "
                        "<out>/.batches/<model>-<rubric version>)")
        sp.add_argument("--yes", action="store_true", help="submit beyond judge.batch."
                        "cost_cap_usd")
        sp.add_argument("--wait", action="store_true", help="batch-collect: poll until done")
        sp.add_argument("--max-wait-s", type=float, help="with --wait: give up after this")
        sp.add_argument("--poll-s", type=float, help="override judge.batch.poll_initial_s")
        sp.set_defaults(func=_batch_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_redaction()
    # Bad input (a config field, a kind, a path) is one line naming it and exit 2, as
    # asteer-build does; a traceback is for bugs.
    try:
        if getattr(args, "inp", None) and not Path(args.inp).exists():
            raise FileNotFoundError(f"--in: no such file or folder {args.inp!r}")
        summary = args.func(args)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"asteer-judge: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    if getattr(args, "exit_code", 0):
        return args.exit_code
    if getattr(args, "strict", False):
        failed, pending = _summary_counts(summary)
        if failed or pending:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
