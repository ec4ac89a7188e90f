"""`asteer-build`: plan, run and inspect a build.

    asteer-build plan CONFIG [--json]
    asteer-build run --config CONFIG [--out DIR] [--executor local|ray]
                     [--rerun-shards 3,17] [--rerun-failed] [--stages vectors,rollouts,judge]
    asteer-build status RUN_DIR
    asteer-build check [CONFIG] [--model NAME_OR_PATH] [--device cpu|cuda] [--tp N]
    asteer-build import [HUB_ID|FOLDER] --out FOLDER [--method M] [--model M] [--repo ORG/NAME]

`plan` and `status` print JSON on stdout (plus a table for `plan`; `plan --json` also
lists the resolved prompts and concepts). `run` and `demo` show
stage lines, progress bars and a short summary; every other line (vLLM, Ray, transformers,
our own log) goes to a log file in the run folder (`logs/build.log`; the demo's
`OUT/logs/demo.log`), unless `--verbose`. Their full summary is `summary.json` in the
run folder, and on stdout with `--json` (for scripts). Exit status: 0 ok, 2 bad config or
arguments (nothing was done), 3 refused (the output folder holds another plan), 1
anything else; errors are printed on stderr, naming the log file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from .core.console import LOG_FORMAT, add_output_flags, console, quiet_for

__all__ = ["main", "build_parser"]


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shard numbers like 3,17 (got {s!r})") from None


def _positive(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens/s (got {s!r})")
    return v


def _stages(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _sampling_text(e: dict[str, Any]) -> str:
    """`temperature 0.7 (config), top_k 20 (generation_config.json), ...`."""
    parts = [f"{k} from the model, unresolved" if e[k] is None else
             f"{k} {e[k]} ({e['source'][k]})" for k in ("temperature", "top_k", "top_p")]
    text = ", ".join(parts)
    return f"{text}\n    ({e['error']})" if e.get("error") else text


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from .pipeline.config import load_config, resolve_config
    from .pipeline.plan import plan_summary

    path = resolve_config(args.config)
    cfg = load_config(path)
    summ = {"config": str(path.resolve()),
            **plan_summary(cfg, listing=args.listing, tok_s=args.tok_s)}
    print(f"config: {summ['config']}", file=sys.stderr)
    for key, src in summ["sources"].items():
        if not src["loaded"]:
            print(f"  {key}: {src['count']} expected, not loaded ({src['not_loaded']})",
                  file=sys.stderr)
        elif (src.get("origin") or {}).get("commit"):
            o = src["origin"]
            print(f"  {key}: {src['count']} from hub:{o['hub']}/{o['file']} at "
                  f"{o['commit'][:12]}", file=sys.stderr)
    print(f"{summ['name']}: {summ['items']:,} rollouts in {summ['shards']:,} shards of "
          f"<= {summ['shard_size']}", file=sys.stderr)
    for r in summ["by_model_method"]:
        print(f"  {r['model']:<28} {r['method']:<9} {r['concepts']} concepts x {r['prompts']} "
              f"prompts x {r['alphas']} alphas = {r['items']:,} items, {r['shards']} shards",
              file=sys.stderr)
    for name, e in summ["sampling"].items():
        print(f"  sampling {name}: {_sampling_text(e)}", file=sys.stderr)
    for name, d in summ["depth"].items():
        if d["num_hidden_layers"] is None:
            print(f"  layer {cfg.layer}: not checked against {name}'s depth "
                  f"({d['unchecked']}); the engine checks it when it starts", file=sys.stderr)
    t = summ["tokens"]
    print(f"  tokens: ~{t['prefill_estimate']:,} prompt, <= {t['decode_upper_bound']:,} "
          f"generated; stages: {' -> '.join(summ['stages'])}", file=sys.stderr)
    _print_judge_estimate(summ.get("judge") or {})
    if "engine_hours" in summ:
        h = summ["engine_hours"]
        print(f"  engine-hours at {h['tok_s']:,g} tok/s and {h['expected_response_tokens']:,} "
              f"tokens per response: {h['engine_hours']:,.2f} in all", file=sys.stderr)
        for m, x in h["by_model"].items():
            print(f"    {m:<28} {x['items']:,} x {h['expected_response_tokens']:,} tokens = "
                  f"{x['engine_hours']:,.2f} h", file=sys.stderr)
        print(f"  assumes: {h['assumptions']}", file=sys.stderr)
    return summ


def _print_judge_estimate(j: dict[str, Any]) -> None:
    """The judge's line of `plan`: tokens in and out, and cost where prices are set."""
    if not j or j.get("kind") == "rules":
        return
    line = (f"  judge {j['model']} ({j['kind']}): {j['calls']:,} calls, ~{j['input_tokens']:,} "
            f"input + ~{j['output_tokens']:,} output tokens ({j['tokenizer']}, responses at "
            f"{j['response_tokens_assumed']} tokens)")
    if "cost_usd" in j:
        c = j["cost_usd"]
        line += f"; ~${c['live']:,.0f} live, ~${c['batch']:,.0f} batch"
    else:
        line += "; set judge.prices for a cost"
    print(line, file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from .pipeline.build import RunOptions, execute_run, log_file, prepare_run, summary_text
    from .pipeline.config import load_config

    cfg = load_config(args.config)
    opts = RunOptions(out=args.out, executor=args.executor, rerun_shards=args.rerun_shards,
                      rerun_failed=args.rerun_failed,
                      stages=args.stages or RunOptions().stages,
                      progress=not args.no_progress, yes=args.yes,
                      sequential=args.sequential)
    # Config and output checks print straight to the terminal; the log file lives in
    # the run folder, which exists only once they pass.
    run = prepare_run(cfg, opts)
    path = log_file(run)
    publisher = _Publisher(run.store.uri, args.publish) if args.publish else None
    try:
        with quiet_for(args, path, f"asteer-build run --config {args.config}"):
            summary = execute_run(run)
            if publisher is not None:
                summary["publish"] = publisher.finish()
            console.summary(summary_text(summary))
    finally:
        if publisher is not None:
            publisher.stop.set()
        if not run.store.local and not args.verbose and path.exists():
            try:  # best effort: a remote run folder keeps its log next to its shards
                run.store.write_bytes_atomic("logs/build.log", path.read_bytes())
            except OSError as e:
                print(f"asteer-build: could not copy the log to {run.store.uri}: {e}",
                      file=sys.stderr)
    return summary


class _Publisher:
    """`run --publish REPO`: `publish --follow` on a thread beside the build, so the
    dataset's files reach the Hub as their shards are labelled. It lives here, not in
    `pipeline.build`: the build may not import the publishing layer. Its failure is
    reported in the summary, never the build's."""

    def __init__(self, run_uri: str, repo: str) -> None:
        import threading

        from .io.publish import follow

        self.stop = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

        def main() -> None:
            try:
                self.result = follow(run_uri, repo, poll_s=10.0, commit_every_s=60.0,
                                     stop=self.stop)
            except BaseException as e:
                self.error = e

        self.thread = threading.Thread(target=main, name="asteer-publish", daemon=True)
        self.thread.start()

    def finish(self) -> dict[str, Any]:
        """The build ended: one last pass (it commits what is ready, and the card and
        build.json when the run is complete), then what was published."""
        self.stop.set()
        self.thread.join()
        if self.error is not None:
            console.say(f"publish: failed: {self.error}", logging.ERROR)
            return {"error": str(self.error)}
        return self.result.as_dict() if hasattr(self.result, "as_dict") else {}


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    from .pipeline.build import build_status

    st = build_status(args.run_dir)
    for name, s in st["stages"].items():
        if "shards_done" in s:
            print(f"  {name:<12} {s['shards_done']}/{s['shards_total']} shards, "
                  f"{s['rows']:,} rows", file=sys.stderr)
        else:
            print(f"  {name:<12} {s['done']}/{s['total']} models", file=sys.stderr)
    return st


def cmd_check(args: argparse.Namespace) -> dict[str, Any]:
    from .pipeline.check import CheckOptions, report_path, run_check

    out = args.out or report_path(args.model or args.config)
    opts = CheckOptions(
        config=args.config, model=args.model, device=args.device, tp=args.tp,
        layer=args.layer, prompts=args.prompts, new_tokens=args.new_tokens,
        throughput_requests=args.throughput_requests,
        throughput_tokens=args.throughput_tokens, reference_only=args.reference_only,
        out=out)
    with quiet_for(args, out.with_suffix(".log"), "asteer-build check"):
        report = run_check(opts)
    for name, c in report["checks"].items():
        print(f"  {name:<24} {'PASS' if c.get('pass') else 'FAIL'}", file=sys.stderr)
    tp = report.get("throughput")
    if tp:
        h = tp["engine_hours"]
        print(f"  throughput: {tp['tok_s']:,.0f} tok/s ({tp['requests']} requests x "
              f"{tp['tokens_per_request']} tokens at the config's shape)\n"
              f"  this config: ~{h['engine_hours']:,.3g} engine-hours on this machine "
              f"(generated tokens only, every model at this speed)", file=sys.stderr)
    print(f"asteer-build check: {'PASS' if report['passed'] else 'FAIL'} -> "
          f"{report['report_path']}", file=sys.stderr)
    if not report["passed"]:
        raise CheckFailed(f"check failed: {', '.join(report['failed'])} "
                          f"(report: {report['report_path']})")
    return report


class CheckFailed(Exception):
    """A pre-flight check failed (exit status 1; the report names it)."""


def _add_check_command(sub: Any) -> None:
    sp = sub.add_parser(
        "check", help="pre-flight: steering on your model and machine against the HF "
        "reference, and the config's engine-hours at this machine's speed")
    sp.add_argument("config", nargs="?", default="asteer-paper",
                    help="a config file or a packaged config (default: asteer-paper); its "
                    "engine arguments, layer, capture and sampling are used")
    sp.add_argument("--model", help="a model of the config by name, or any path / Hub id "
                    "(then with the engine arguments of the config's first model)")
    sp.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="where the HF reference runs (default: cuda when available)")
    sp.add_argument("--tp", type=int, default=None, help="tensor-parallel size")
    sp.add_argument("--layer", type=int, default=None, help="default: the config's layer")
    sp.add_argument("--prompts", type=int, default=4)
    sp.add_argument("--new-tokens", type=int, default=16)
    sp.add_argument("--throughput-requests", type=int, default=None, metavar="N",
                    help="requests in the throughput run (default: the engine's "
                    "max_num_seqs, at most 256; 0 skips it)")
    sp.add_argument("--throughput-tokens", type=int, default=128, metavar="N")
    sp.add_argument("--reference-only", action="store_true",
                    help="only the HF half (a machine without vLLM)")
    from pathlib import Path

    sp.add_argument("--out", type=Path, default=None, help="the JSON report (default: "
                    "$ASTEER_CACHE/check/, else ~/.cache/asteer/check/)")
    add_output_flags(sp)
    sp.set_defaults(fn=cmd_check)


def cmd_import(args: argparse.Namespace) -> dict[str, Any]:
    from .io.authors.importer import import_and_upload

    res = import_and_upload(
        args.source, args.out, repo=args.repo, private=args.private, dry_run=args.dry_run,
        revision=args.revision, methods=args.method, models=args.model,
        overwrite=args.overwrite, tokenizers=args.tokenizer,
    )
    for p in res.pairs:
        print(f"  {p['method_dir']}/{p['model']}: {p['rows']:,} rows from {p['files']:,} "
              f"files ({p['failed']:,} failed judgments flagged, {p['pending']:,} unlabelled)",
              file=sys.stderr)
    print(f"{res.folder}: " + ", ".join(f"{k} {v:,}" for k, v in res.counts.items())
          + (f"; uploaded to {res.repo}" if res.uploaded else ""), file=sys.stderr)
    return res.as_dict()


def _add_import_command(sub: Any) -> None:
    from .io.authors.importer import AUTHORS_REPO

    sp = sub.add_parser(
        "import", help="convert the reference authors' released generations and judgments "
        "into a dataset folder (the layout `publish` writes)")
    sp.add_argument("source", nargs="?", default=AUTHORS_REPO,
                    help="a Hub dataset id (downloads only the result tarballs and judgment "
                    f"caches it needs) or a local folder (default: {AUTHORS_REPO})")
    sp.add_argument("--out", required=True, help="the dataset folder to write")
    sp.add_argument("--method", action="append",
                    help="only this method (their folder name, e.g. probe_l2-0.01, or ours: "
                    "diffmean, probe); repeatable")
    sp.add_argument("--model", action="append",
                    help="only this model (their folder name, e.g. gemma-2-2b-it); repeatable")
    sp.add_argument("--revision", help="Hub revision of the source (default: main)")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    sp.add_argument("--tokenizer", action="append",
                    help="fill response_tokens by counting each response with this "
                    "tokenizer: MODEL=NAME_OR_PATH (their model folder name), repeatable, "
                    "or `auto` (the authors' own model -> tokenizer table); their files "
                    "hold no lengths")
    sp.add_argument("--repo", help="also upload the folder to this Hub dataset repo ORG/NAME")
    sp.add_argument("--private", action="store_true")
    sp.add_argument("--dry-run", action="store_true", help="with --repo: write, do not upload")
    sp.set_defaults(fn=cmd_import)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asteer-build", description=__doc__.split("\n")[0])
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("plan", help="counts, shards and token estimate of a config")
    sp.add_argument("config", help="a config file, or a packaged config by name "
                    "(asteer-paper, demo)")
    sp.add_argument("--json", dest="listing", action="store_true",
                    help="the JSON on stdout also lists the resolved prompts (prompt_id, "
                    "source_index, prompt) and concepts (concept_id, level, partition)")
    sp.add_argument("--tok-s", type=_positive, default=None, metavar="N",
                    help="project engine-hours at N generated tokens/s per engine, from "
                    "sampling.expected_response_tokens")
    sp.set_defaults(fn=cmd_plan)
    sp = sub.add_parser("run", help="build (or resume) a run folder")
    sp.add_argument("--config", required=True)
    sp.add_argument("--out", help="output location (overrides the config's `output:`)")
    from .pipeline.executors import EXECUTORS

    sp.add_argument("--executor", choices=tuple(EXECUTORS), default="local")
    sp.add_argument("--rerun-shards", type=_ints, default=[],
                    help="comma-separated shard numbers to rebuild")
    sp.add_argument("--rerun-failed", action="store_true",
                    help="re-judge rows whose judge_status is failed or pending")
    sp.add_argument("--stages", type=_stages, default=None,
                    help="comma-separated subset of vectors,rollouts,judge")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("--yes", action="store_true",
                    help="submit Batch API judge work beyond judge.batch.cost_cap_usd")
    sp.add_argument("--sequential", action="store_true",
                    help="judge after the last rollouts shard instead of as shards commit")
    sp.add_argument("--publish", metavar="REPO",
                    help="also publish to this Hub dataset repo as shards are labelled "
                         "(`publish --follow` beside the build; token from HF_TOKEN)")
    add_output_flags(sp)
    sp.set_defaults(fn=cmd_run)
    sp = sub.add_parser("status", help="progress per stage of a run folder")
    sp.add_argument("run_dir")
    sp.set_defaults(fn=cmd_status)
    from .io.publish.cli import add_publish_command

    add_publish_command(sub)
    _add_import_command(sub)
    _add_check_command(sub)
    from .demo import add_demo_command

    add_demo_command(sub)
    return p


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (`kill`, `ray job stop`, a scheduler) unwinds like Ctrl-C: Python's default
    would end the process on the spot, leaving the engines' vLLM core processes running
    without it; raised here, the build's `finally` shuts them down."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    # stdout carries the JSON summary only; vLLM logs to stdout by default.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    # `plan`, `status` and `publish` always print their JSON; `run` and `demo` with --json.
    prints_json = getattr(args, "json", True)
    console.json = prints_json
    from .inputs.sources import SourceError
    from .pipeline.build import BuildRefused
    from .pipeline.config import ConfigError
    from .pipeline.judge_stage import CostCapRefused

    # Errors are printed after a quiet block has put the terminal back, so they reach it;
    # the traceback, when there is one, is in the log file named by the hint.
    try:
        out = args.fn(args)
    except (ConfigError, SourceError) as e:
        print(f"asteer-build: config error: {e}{console.log_hint()}", file=sys.stderr)
        return 2
    except BuildRefused as e:
        print(f"asteer-build: {e}", file=sys.stderr)
        return 3
    except CostCapRefused as e:  # the code `asteer-judge` exits with on the cap
        print(f"asteer-build: {e}", file=sys.stderr)
        return 4
    except CheckFailed as e:
        print(f"asteer-build: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"asteer-build: error: {e}{console.log_hint()}", file=sys.stderr)
        return 2
    except Exception as e:
        if console.log_path is None:
            raise  # not quiet: the traceback is on the terminal already
        print(f"asteer-build: error: {type(e).__name__}: {e}{console.log_hint()}",
              file=sys.stderr)
        return 1
    if prints_json:
        print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
