"""`asteer_build.rollouts`, the import path the README gives for `run_rollouts`,
`RolloutResult` and `CaptureSettings`, and `asteer-train suggest --live` uses for
`probe_feature_rows`; they live in the pipeline layer (`asteer_build.pipeline.rollouts`,
`asteer_build.pipeline.probe`)."""

from .pipeline.probe import probe_feature_rows
from .pipeline.rollouts import CaptureSettings, RolloutResult, run_rollouts, run_with_capture

__all__ = ["CaptureSettings", "RolloutResult", "probe_feature_rows", "run_rollouts",
           "run_with_capture"]
