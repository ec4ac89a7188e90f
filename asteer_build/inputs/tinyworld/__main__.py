"""`python -m asteer_build.inputs.tinyworld`: write the tiny-world model, print its path."""

from __future__ import annotations

from .models import TinyWorldSpec, build_tiny_model


def main() -> None:  # pragma: no cover - convenience entry
    import argparse

    p = argparse.ArgumentParser(description="Write the tiny-world model and print its path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed-scale", type=float, default=TinyWorldSpec.embed_scale)
    p.add_argument("--init-range", type=float, default=TinyWorldSpec.initializer_range)
    a = p.parse_args()
    spec = TinyWorldSpec(seed=a.seed, embed_scale=a.embed_scale, initializer_range=a.init_range)
    print(build_tiny_model(spec))


if __name__ == "__main__":  # pragma: no cover
    main()

