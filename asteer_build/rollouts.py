"""`asteer_build.rollouts`, the import path the README gives for `run_rollouts`,
`RolloutResult` and `CaptureSettings`; they live in the pipeline layer
(`asteer_build.pipeline.rollouts`)."""

from .pipeline.rollouts import CaptureSettings, RolloutResult, run_rollouts, run_with_capture

__all__ = ["CaptureSettings", "RolloutResult", "run_rollouts", "run_with_capture"]
