"""The assembly: a run folder in, the dataset folder (Parquet per config, vectors,
build.json, card) out, brought up to date in place; no network.

Every planned file whose key and sha256 match the folder's state file is skipped, any
other is written under a dot-prefixed temp name and renamed, so publishing the same run
twice produces identical bytes, and a killed publish picks up where it died.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ...core import atomic
from ...core.paths import cache_dir
from ...pipeline.shards import MANIFEST, Manifest, open_store
from .boundaries import span_ready
from .build_json import build_json
from .card import dataset_card, label_table
from .layout import CONFIGS, PUBLISH_FORMAT, PublishError, PublishOptions, PublishResult
from .parquet import write_file
from .plan import ConfigPlan, RunInfo, file_key, plan_configs, scan_run, stage_entries
from .state import RunCache, State, sha256_file

log = logging.getLogger("asteer_build.publish")


def _copy_vectors(
    info: RunInfo, folder: Path, state: State, opts: PublishOptions
) -> tuple[list[str], list[str], list[str]]:
    """Vector files as the vectors stage committed them, checked against the manifest."""
    planned, written, skipped = [], [], []
    for model, e in stage_entries(info.manifest, "vectors"):
        parts = e.get("parts") or {}
        if not parts:
            raise PublishError(f"build.json: vectors entry {model!r} lists no files")
        for rel, sha in sorted(parts.items()):
            planned.append(rel)
            key = hashlib.sha256(f"{PUBLISH_FORMAT}|{rel}|{sha}".encode()).hexdigest()
            if state.done(rel, key, folder):
                skipped.append(rel)
                continue
            data = info.store.read_bytes(rel)
            if hashlib.sha256(data).hexdigest() != sha:
                raise PublishError(f"{rel}: contents do not match build.json's checksum")
            atomic.write_bytes(folder / rel, data)
            state.record(
                rel,
                {
                    "key": key,
                    "sha256": sha,
                    "bytes": len(data),
                    "rows": None,
                    "nbytes": len(data),
                    "config": "vectors",
                },
            )
            written.append(rel)
            if opts.on_file:
                opts.on_file(rel)
    return planned, written, skipped


def default_folder(repo: str | None, run_dir: str) -> str:
    root = cache_dir()
    name = (repo or Path(run_dir.rstrip("/")).name or "dataset").replace("/", "--")
    return str(root / "publish" / name)


def assemble(
    run_dir: str,
    folder: str,
    *,
    repo: str | None = None,
    opts: PublishOptions | None = None,
    ready_only: bool = False,
    manifest: Manifest | None = None,
    cache: RunCache | None = None,
) -> PublishResult:
    """Build (or bring up to date) the dataset folder from a run folder; no network.

    `ready_only` (a run still building, `follow`): only the data files that can no longer
    change (every shard of their span committed, their config's schema final) and the
    vectors; no concepts, prompts, card or build.json, and nothing removed, since those
    depend on the whole run. `manifest`: the one the caller judged the run by; `cache`:
    what an earlier pass over the same run and folder learned."""
    opts = opts or PublishOptions()
    unknown = [c for c in opts.configs if c not in CONFIGS]
    if unknown:
        raise PublishError(f"--configs: unknown config(s) {unknown} (known: {', '.join(CONFIGS)})")
    if "rollouts" not in opts.configs:
        raise PublishError("--configs: `rollouts` is the default config and always published")
    store = open_store(run_dir)
    manifest = manifest or Manifest.load(store)
    if manifest is None:
        raise FileNotFoundError(f"{store.uri}: not a run folder (no {MANIFEST})")
    out = Path(folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic.clean_temps(out)
    state = State(out, cache)
    info = scan_run(store, manifest, opts, cache)
    if not ready_only:
        plans = plan_configs(info, opts.configs, opts)
    elif manifest.entries("rollouts"):
        # a capture stage asked for by name may simply not have a shard yet
        every = plan_configs(info, opts.configs, dataclasses.replace(opts, explicit=False))
        plans = [_ready_part(cp, manifest) for cp in every if cp.final and cp.table is None]
    else:
        plans = []
    result = PublishResult(str(out), repo, [])
    planned: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    for cp in plans:
        c = counts.setdefault(cp.name, {"rows": 0, "files": 0, "bytes": 0, "nbytes": 0})
        extra = {
            "schema": cp.schema.to_string(),
            "features": cp.features.to_dict(),
            "row_group_bytes": opts.row_group_bytes,
            "row_group_max_rows": opts.row_group_max_rows,
        }
        if cp.table is not None:
            extra["table"] = hashlib.sha256(
                json.dumps(cp.table.to_pylist(), sort_keys=True).encode()
            ).hexdigest()
        for f in cp.files:
            f.key = file_key(f, extra)
            planned.append(f.path)
            e = state.done(f.path, f.key, out)
            if e is None:
                rows, nbytes = write_file(info, cp, f, out, opts)
                p = out / f.path
                e = {
                    "key": f.key,
                    "sha256": sha256_file(p),
                    "bytes": p.stat().st_size,
                    "rows": rows,
                    "nbytes": nbytes,
                    "config": cp.name,
                }
                state.record(f.path, e)
                result.written.append(f.path)
                log.info("wrote %s (%d rows, %.1f MB)", f.path, rows, e["bytes"] / 1e6)
                if opts.on_file:
                    opts.on_file(f.path)
            else:
                result.skipped.append(f.path)
            c["rows"] += e["rows"]
            c["files"] += 1
            c["bytes"] += e["bytes"]
            c["nbytes"] += e["nbytes"]
    has_vectors = "vectors" in opts.configs and bool(manifest.entries("vectors"))
    if has_vectors:
        vplanned, vw, vs = _copy_vectors(info, out, state, opts)
        planned += vplanned
        result.written += vw
        result.skipped += vs
        counts["vectors"] = {
            "rows": len(vplanned),
            "files": len(vplanned),
            "bytes": sum(state.files[p]["bytes"] for p in vplanned),
            "nbytes": 0,
        }
    if ready_only:
        result.files = _entries(state, planned)
        return result
    # Files of an earlier publish that this one does not produce (a config left out, a
    # run that shrank) would otherwise be matched by the card's globs and uploaded.
    keep = set(planned) | {"README.md", MANIFEST}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not rel.startswith(".") and rel not in keep and "/." not in rel:
            p.unlink()
            state.forget(rel)
            result.removed.append(rel)
    for rel in list(state.files):
        if rel not in keep:
            state.forget(rel)
    for d in sorted((p for p in out.rglob("*") if p.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    files = _entries(state, planned)
    rollout_files = [f.path for cp in plans if cp.name == "rollouts" for f in cp.files]
    labels = label_table(out, rollout_files)
    _write_if_changed(
        out / MANIFEST,
        build_json(
            info, files, [cp.name for cp in plans] + (["vectors"] if has_vectors else []), opts
        ),
    )
    _write_if_changed(
        out / "README.md",
        dataset_card(repo, info, plans, counts, labels, has_vectors, opts).encode(),
    )
    result.files = files + [
        _file_entry(out, MANIFEST, "build.json"),
        _file_entry(out, "README.md", "card"),
    ]
    result.counts = {k: v["rows"] for k, v in counts.items()}
    return result


def _ready_part(cp: ConfigPlan, manifest: Manifest) -> ConfigPlan:
    done = manifest.entries(cp.stage or "")
    files = [f for f in cp.files if f.span is not None and span_ready(f.span, done)]
    return dataclasses.replace(cp, files=files)


def _entries(state: State, planned: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "path": p,
            "config": state.files[p]["config"],
            "rows": state.files[p]["rows"],
            "bytes": state.files[p]["bytes"],
            "sha256": state.files[p]["sha256"],
        }
        for p in sorted(planned)
    ]


def _write_if_changed(p: Path, data: bytes) -> None:
    if p.is_file() and p.read_bytes() == data:
        return
    atomic.write_bytes(p, data)


def _file_entry(folder: Path, rel: str, config: str) -> dict[str, Any]:
    p = folder / rel
    return {
        "path": rel,
        "config": config,
        "rows": None,
        "bytes": p.stat().st_size,
        "sha256": sha256_file(p),
    }
