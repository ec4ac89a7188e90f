"""`bench_build.py --s3`: the long-tail build with its output on an S3 API behind a slow
link, versus a local folder, in paired rounds.

The S3 API is moto (in this process, `tests/s3_support.py`) behind a TCP proxy that
delays each chunk and caps the upload bandwidth. The cap is calibrated on a first local
build (not counted): uploading that build's files one after another would take
`--upload-share` of its generate phase at the link's bandwidth alone (0.15 by default;
per-chunk latency and the journal objects add to it: the measured share is reported).
What is compared is the generate phase (first request submitted to last rollout
finished): the builder uploads from its writer thread while the engine generates, so a
slow store should cost the engine nothing. Capture is on (features and activations:
the most bytes per shard). Upload seconds are the build's own count
(`summary.store_writes.seconds`: time spent in store writes, summed).

    python benchmarks/bench_build.py --s3 [--pairs 3] [--upload-share 0.15]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.bench_build import _build, _prepare
from benchmarks.common import paired_summary, write


def _upload(base: Path, endpoint: str, prefix: str) -> None:
    """The vectors-only run folder onto the server (straight, not through the slow link:
    it is not part of what is measured)."""
    import boto3

    from tests.s3_support import BUCKET

    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="k", aws_secret_access_key="s")
    for f in sorted(base.rglob("*")):
        if f.is_file():
            c.put_object(Bucket=BUCKET, Key=f"{prefix}/{f.relative_to(base).as_posix()}",
                         Body=f.read_bytes())


def s3_main(a: argparse.Namespace) -> None:
    from tests.s3_support import BUCKET, s3_env, s3_server

    with tempfile.TemporaryDirectory(prefix="bench-build-s3-") as d:
        tmp = Path(d)
        _, cfg_on, plan, ids, lens, lengths, base = _prepare(tmp, a)
        cal = _build(cfg_on, base, tmp / "calibrate", "local", lengths)
        written = cal["store_writes"]["bytes"]
        bandwidth = written / (a.upload_share * cal["generate_seconds"])
        print(json.dumps({"calibration": {"generate_seconds": cal["generate_seconds"],
                                          "bytes": written,
                                          "bandwidth_bytes_per_s": round(bandwidth)}}),
              flush=True)
        rounds: list[dict] = []
        with s3_server(latency_s=a.latency_ms / 1000, bandwidth=bandwidth) as (srv, url):
            for i in range(a.pairs):
                rd = {"local": _build(cfg_on, base, tmp / f"l{i}", "local", lengths)}
                prefix = f"round{i}"
                _upload(base, srv.url, prefix)
                rd["s3"] = _build(cfg_on, base, f"s3://{BUCKET}/{prefix}", "local", lengths,
                                  env_extra=s3_env(url))
                w = rd["s3"]["store_writes"]
                rd["upload_share_of_generate"] = round(
                    w["seconds"] / rd["s3"]["generate_seconds"], 3)
                rounds.append(rd)
                print(json.dumps({"round": i, "local_tok_s": rd["local"]["tok_s"],
                                  "s3_tok_s": rd["s3"]["tok_s"],
                                  "upload_seconds": w["seconds"],
                                  "upload_share": rd["upload_share_of_generate"]}), flush=True)
                gen = paired_summary([r["local"]["tok_s"] for r in rounds],
                                     [r["s3"]["tok_s"] for r in rounds])
                write("bench_build_s3", {
                    "workload": {"config": "configs/demo.yaml", "capture": True,
                                 "alphas_per_method": a.alphas, "items": len(ids),
                                 "shards": len(plan.shards), "cap": a.cap, "seed": a.seed,
                                 "useful_tokens": sum(lens), "pairs": len(rounds),
                                 "pairs_planned": a.pairs},
                    "link": {"latency_ms_per_chunk": a.latency_ms,
                             "bandwidth_bytes_per_s": round(bandwidth),
                             "calibrated_upload_share": a.upload_share,
                             "calibration": {k: cal[k] for k in ("generate_seconds",
                                                                 "store_writes")}},
                    "rounds": rounds,
                    "ratios": {
                        # throughput in the generate phase: s3 / local (>= 0.95 wanted)
                        "s3_over_local_generate": gen,
                        "upload_share_of_generate": [r["upload_share_of_generate"]
                                                     for r in rounds],
                    },
                    "upload_seconds": [r["s3"]["store_writes"]["seconds"] for r in rounds],
                    "targets": {"s3_over_local_generate": ">= 0.95",
                                "upload_share_of_generate": ">= 0.10"},
                })
