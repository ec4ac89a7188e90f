"""vLLM `general_plugins` entry point (see pyproject.toml).

vLLM loads it in every process that runs an engine core or a worker, which is where the
scheduler hashes prefix-cache blocks. It installs the block-hash salt for steered
requests (requests without an asteer spec hash exactly as before), and the reporter that
hands a failed start's cause back to the process that started the engine
(`startup.py`).
"""

from __future__ import annotations


def register() -> None:
    from .prefix_cache import install
    from .startup import install_reporter

    install()
    install_reporter()
