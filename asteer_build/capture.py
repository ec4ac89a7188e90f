"""`asteer_build.capture`, the import path the README has always given for
`CaptureSettings`: capture, replay and features now live with the rollouts they belong
to (`asteer_build.rollouts`); this module keeps the public names where users import them.
"""

from .pipeline.rollouts import (
    DEFAULT_OFFSETS,
    DEFAULT_STEPS,
    CaptureSettings,
    activation_bytes,
    run_one_with_capture_async,
    run_with_capture,
)

__all__ = ["CaptureSettings", "run_with_capture", "run_one_with_capture_async",
           "activation_bytes", "DEFAULT_STEPS", "DEFAULT_OFFSETS"]
