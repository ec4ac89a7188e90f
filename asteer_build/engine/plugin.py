"""vLLM `general_plugins` entry point (see pyproject.toml).

vLLM loads it in every process that runs an engine core or a worker, which is where the
scheduler hashes prefix-cache blocks. It only installs the block-hash salt for steered
requests; requests without an asteer spec hash exactly as before.
"""

from __future__ import annotations


def register() -> None:
    from .prefix_cache import install

    install()
