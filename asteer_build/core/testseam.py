"""The one door through which tests and benchmarks reach into product code.

Product paths never read ad-hoc environment variables for test or benchmark
behaviour: they ask `hook(name)` for one of the hooks listed here, so a reader sees
every way a test can bend a build in one place, and a real run (the variable unset)
provably gets none of them.

The hooks travel in one environment variable, `ASTEER_TEST_SEAM`, because they must
reach the processes a build starts and does not hand arguments to: the CLI a test
spawns, vLLM's engine-core processes, and Ray actors (a job's `runtime_env.env_vars`).
Its value is a JSON object `{hook: value}`, or the path of a file holding one. Use
`seam_env(...)` to write it, so a typo fails where it is made.

Hooks (name: value type; who sets it; what it does):

- `commit_delay_s`: number of seconds; tests/test_pipeline_build.py (the SIGKILL
  mid-commit tests, local and Ray). `shards` sleeps this long while a written shard
  sits under its temp name, before the rename, so a test can kill the writer exactly
  mid-commit.
- `actor_pid_dir`: folder path; tests/test_pipeline_build.py (the Ray actor SIGKILL
  test). Each Ray engine actor writes `<pid>.pid` there once its engine is up, so a
  test finds the process to kill, and sees its replacement start.
- `check_break`: one of `CHECK_BREAKS`; tests/test_check.py. Breaks the steered engine
  on purpose so `asteer-build check` can be seen to catch each fault: `addition` (the
  row holds `v`, whatever alpha), `position_mode` (every mode steers from position 0),
  `capture_layer` (block l's capture lands in block l + 1's slot), `mixed_batch` (every
  steered token of a step reads the first steered request's row). Read once when the
  worker's steering state and capture buffer are built.
- `bench_lengths`: path of a JSON file `{item id: response length}`;
  benchmarks/bench_build.py. Each listed request runs exactly that many tokens
  (`ignore_eos`, per-request `max_tokens`), giving a build the reference workload's
  long-tailed lengths. Its rows are then not the model's responses: never for a real
  build.

A malformed value (not JSON, not an object, an unknown hook, a value of the wrong
type, a missing file) is an error naming the variable and the hook: a seam that
silently ignored a typo would let a fault test pass without injecting its fault.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CHECK_BREAKS", "ENV_VAR", "HOOKS", "hook", "seam_env"]

ENV_VAR = "ASTEER_TEST_SEAM"

#: hook name -> (the value types it accepts, their name in an error message)
HOOKS: dict[str, tuple[tuple[type, ...], str]] = {
    "commit_delay_s": ((int, float), "a number of seconds"),
    "actor_pid_dir": ((str,), "a folder path"),
    "bench_lengths": ((str,), "a JSON file path"),
    "check_break": ((str,), "one of addition, position_mode, capture_layer, mixed_batch"),
}
CHECK_BREAKS = ("addition", "position_mode", "capture_layer", "mixed_batch")


def hook(name: str) -> Any:
    """The value the running test or benchmark gave hook `name`, or None (always None in
    a real run). The variable is read at each call (a benchmark may set it after
    import) and each distinct value parsed once."""
    if name not in HOOKS:
        raise KeyError(f"testseam: no hook {name!r} (hooks: {', '.join(HOOKS)})")
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return None
    return _parse(raw).get(name)


def seam_env(**hooks: Any) -> dict[str, str]:
    """`{ENV_VAR: value}` setting these hooks, for a subprocess's or a Ray job's
    environment; checked as `hook` would check it."""
    raw = json.dumps(hooks, sort_keys=True)
    _check(hooks, f"{ENV_VAR}={raw}")
    return {ENV_VAR: raw}


@functools.lru_cache(maxsize=8)
def _parse(raw: str) -> dict[str, Any]:
    where = ENV_VAR
    text = raw
    if not raw.lstrip().startswith(("{", "[")):
        where = f"{ENV_VAR} file {raw}"
        try:
            text = Path(raw).read_text()
        except OSError as e:
            raise ValueError(f"{ENV_VAR}: {raw!r} is neither a JSON object nor a readable "
                             f"file ({type(e).__name__}: {e.strerror or e})") from None
    try:
        hooks = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(hooks, dict):
        raise ValueError(f"{where}: expected a JSON object {{hook: value}} "
                         f"(got {type(hooks).__name__})")
    _check(hooks, where)
    return hooks


def _check(hooks: dict[str, Any], where: str) -> None:
    for name, value in hooks.items():
        if name not in HOOKS:
            raise ValueError(f"{where}: unknown hook {name!r} (hooks: {', '.join(HOOKS)})")
        types, what = HOOKS[name]
        if isinstance(value, bool) or not isinstance(value, types) or (
                name == "check_break" and value not in CHECK_BREAKS):
            raise ValueError(f"{where}: {name}: expected {what} (got {value!r})")
