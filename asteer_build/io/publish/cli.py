"""`asteer-build publish` (and `--follow`, `follow`): the subcommand's arguments and its
report on stderr (the JSON summary goes to stdout through the CLI)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .follow import follow
from .hub import publish
from .layout import CONFIGS, DEFAULT_CONFIGS, PARTITION_SCHEMES, PublishOptions


def _configs_arg(s: str) -> tuple[str, ...]:
    vals = tuple(x.strip() for x in s.split(",") if x.strip())
    if vals == ("all",):
        return CONFIGS
    return tuple(dict.fromkeys(("rollouts", *vals)))


def cmd_publish(args: argparse.Namespace) -> dict[str, Any]:
    # one INFO line per HTTP request (every poll of --follow) drowns the publish's own;
    # they stay with --log-level DEBUG
    if logging.getLogger().level > logging.DEBUG:
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    opts = PublishOptions(
        configs=args.configs or DEFAULT_CONFIGS,
        explicit=args.configs is not None,
        folder=args.folder,
        partition_scheme=args.partition,
        target_file_bytes=args.target_file_bytes,
    )
    if args.follow:
        return _cmd_follow(args, opts)
    res = publish(args.run_dir, args.repo, opts=opts, private=args.private, dry_run=args.dry_run)
    width = max((len(f["path"]) for f in res.files), default=10)
    print(
        f"{res.folder}: {len(res.files)} files, "
        f"{sum(f['bytes'] for f in res.files) / 1e6:,.1f} MB "
        f"({len(res.written)} written, {len(res.skipped)} unchanged)",
        file=sys.stderr,
    )
    for f in res.files:
        print(
            f"  {f['path']:<{width}} {f['bytes']:>14,} B"
            + (f" {f['rows']:>10,} rows" if f["rows"] is not None else ""),
            file=sys.stderr,
        )
    print(
        f"{'dry run: nothing uploaded' if args.dry_run else f'uploaded to {args.repo}'}",
        file=sys.stderr,
    )
    return res.as_dict()


def _cmd_follow(args: argparse.Namespace, opts: PublishOptions) -> dict[str, Any]:
    res = follow(
        args.run_dir,
        args.repo,
        opts=opts,
        private=args.private,
        dry_run=args.dry_run,
        poll_s=args.poll_s,
        timeout_s=args.timeout,
        commit_every_s=args.commit_every_s,
    )
    if args.dry_run:
        width = max((len(f["path"]) for f in res.files), default=10)
        print(f"{res.folder}: {len(res.files)} file(s) ready to upload"
              + ("" if res.complete else " (run not complete: no card or build.json yet)"),
              file=sys.stderr)
        for f in res.files:
            print(f"  {f['path']:<{width}} {f['bytes']:>14,} B", file=sys.stderr)
        print("dry run: nothing uploaded", file=sys.stderr)
    else:
        print(
            f"{args.repo}: {len(res.uploaded)} file(s) uploaded in {res.commits} commit(s), "
            f"{len(res.present)} already there; "
            + ("run complete" if res.complete else "run NOT complete (timed out)"),
            file=sys.stderr,
        )
    return res.as_dict()


def add_publish_command(sub: Any) -> None:
    """Register `asteer-build publish` on the CLI's subparsers."""
    sp = sub.add_parser("publish", help="assemble a run folder as a HF dataset and upload it")
    sp.add_argument("run_dir")
    sp.add_argument("--repo", required=True, help="Hub dataset repo id, ORG/NAME")
    sp.add_argument("--private", action="store_true")
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="assemble the folder and list its files; no token, no upload",
    )
    sp.add_argument(
        "--configs",
        type=_configs_arg,
        default=None,
        help=f"comma-separated subset of {','.join(CONFIGS)} or `all` "
        f"(default: {','.join(DEFAULT_CONFIGS)}; rollouts always)",
    )
    sp.add_argument("--folder", help="local dataset folder (default: under ~/.cache/asteer)")
    sp.add_argument(
        "--partition",
        choices=PARTITION_SCHEMES,
        default="stratified",
        help="the concepts' `partition` column: stratified = the reference authors' "
        "per-level draw; contiguous = their legacy static ranges",
    )
    sp.add_argument(
        "--target-file-bytes",
        type=int,
        default=PublishOptions.target_file_bytes,
        help="Parquet file size target: sets how many planned shards a data file holds "
        "(keep it the same across publishes of one run, or the files change)",
    )
    sp.add_argument(
        "--follow",
        action="store_true",
        help="publish while the run builds: each data file as soon as all its shards are "
        "labelled, the card and build.json when every planned shard is; resumable",
    )
    sp.add_argument("--poll-s", type=float, default=30.0,
                    help="--follow: seconds between reads of the run's manifest")
    sp.add_argument("--timeout", type=float, default=None,
                    help="--follow: stop after this many seconds (ready files still go up)")
    sp.add_argument("--commit-every-s", type=float, default=300.0,
                    help="--follow: least seconds between two Hub commits")
    sp.set_defaults(fn=cmd_publish)
