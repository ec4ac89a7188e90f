"""Transfer across tiny models and methods: leave-one-model-out and
leave-one-method-out macro-F1 of one pooled predictor vs the held-out pair's own
per-pair predictor and alpha-only baseline, over 10 split seeds (`train.transfer`).

The dataset is builder-made: benchmarks/configs/transfer.yaml (three tiny Llamas drawn
from seeds 0, 1, 2; DiffMean and probe; rules judge), built and assembled once into
benchmarks/.work/transfer/dataset (an existing build folder is resumed, not redone).

Run:  .venv/bin/python benchmarks/transfer.py [--data DATASET_DIR] [--seeds 10] [--trials 5]
Writes benchmarks/results/transfer.json (and transfer.md next to it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, write  # noqa: E402

CONFIG = ROOT / "benchmarks" / "configs" / "transfer.yaml"
WORK = ROOT / "benchmarks" / ".work" / "transfer"


def transfer_dataset() -> tuple[Path, float | None]:
    """The assembled dataset folder (built once) and the build seconds if built now."""
    folder = WORK / "dataset"
    if (folder / "README.md").is_file():
        return folder, None
    from asteer_build.io.publish import assemble
    from asteer_build.pipeline.build import RunOptions, run_build
    from asteer_build.pipeline.config import load_config

    t0 = time.perf_counter()
    build = run_build(load_config(CONFIG), RunOptions(out=str(WORK / "build")))
    assemble(build["run"], str(folder), repo="local/asteer-transfer")
    return folder, round(time.perf_counter() - t0, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="an assembled dataset folder (default: build the config)")
    ap.add_argument("--seeds", type=int, default=10, help="split seeds 0..N-1")
    ap.add_argument("--trials", type=int, default=5, help="random-search trials per fit")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from train.transfer import run_transfer, transfer_markdown

    if a.data:
        folder, build_s = Path(a.data), None
    else:
        folder, build_s = transfer_dataset()
    res = run_transfer(
        folder, split_seeds=tuple(range(a.seeds)), n_trials=a.trials, num_threads=a.threads,
        log=lambda m: print(m, flush=True),
    )
    res["config"] = str(CONFIG.relative_to(ROOT))
    res["source"] = (
        str(folder.resolve().relative_to(ROOT))
        if folder.resolve().is_relative_to(ROOT) else str(folder)
    )
    summary = WORK / "build" / "summary.json"
    if build_s is None and summary.is_file():  # built earlier (e.g. by `asteer-build run`)
        import json

        build_s = json.loads(summary.read_text()).get("seconds")
    if build_s is not None:
        res["build_seconds_2_shared_cores"] = build_s
    write("transfer", res)
    (RESULTS / "transfer.md").write_text(transfer_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
