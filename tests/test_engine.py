"""The steered engine on real vLLM (CPU) with the tiny model, default multiprocess engine.

The session's shared engine, prefix caching on (vLLM's default), serves the module; one
without prefix caching (in the test process) is added for the on/off comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

from asteer_build.engine import POSITION_MODES, SteerSpec
from asteer_build.engine.reference import HFReference

from .conftest import PROMPTS, SHARED_ENGINE, chat_ids

HIDDEN = 128
NEW = 16


def _vectors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {name: torch.randn(HIDDEN, generator=g) for name in ("ocean", "music", "robot")}


@pytest.fixture(scope="module")
def engine(engines, varied_model):
    """The session's shared engine (conftest.SHARED_ENGINE: chunked prefill on)."""
    eng = engines.get(varied_model, **SHARED_ENGINE)
    eng.register_vectors(_vectors())
    return eng


@pytest.fixture(scope="module")
def prompts(varied_model):
    return chat_ids(varied_model, PROMPTS)


@pytest.fixture(scope="module")
def long_prompts(varied_model):
    """Prompts spanning several 32-token KV blocks, so prefix caching has blocks to share."""
    return chat_ids(varied_model, [" ".join([q] * 8) for q in PROMPTS[:3]])


def _greedy(n: int = NEW):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def _run(engine, prompts, specs, params=None):
    return _tokens(
        engine.generate([{"prompt_token_ids": p} for p in prompts], params or _greedy(), specs)
    )


def test_default_engine_is_multiprocess(engine):
    core = engine.llm.llm_engine.engine_core
    assert type(core).__name__ == "SyncMPClient"
    (info,) = engine.info()
    assert info["adapter"] == "cpu-v1"
    assert info["steer_layers"] == list(range(6))
    assert {"ocean", "music", "robot"} <= set(info["vectors"])  # other modules add theirs


def test_alpha_zero_is_byte_identical(engine, prompts):
    base = _run(engine, prompts, [None] * len(prompts))
    for mode in POSITION_MODES:
        for layer in (0, 2, 5):
            zero = _run(engine, prompts, [SteerSpec("ocean", 0.0, layer, mode)] * len(prompts))
            assert zero == base, (mode, layer)
    # ...and steering is not a no-op, so the equality above means something.
    steered = _run(engine, prompts, [SteerSpec("ocean", 4.0, 2)] * len(prompts))
    assert sum(s != b for s, b in zip(steered, base, strict=True)) >= len(prompts) // 2


def _mixed_batch(prompts):
    specs = [
        None,
        SteerSpec("ocean", 2.0, 1),
        SteerSpec("music", 3.0, 3, "generated"),
        None,
        SteerSpec("robot", 1.5, 0, "last_prompt_and_generated"),
        SteerSpec("ocean", 5.0, 5),
        SteerSpec("music", 0.5, 2, "last_prompt_and_generated"),
        SteerSpec("robot", 4.0, 4, "generated"),
    ]
    reqs = []
    for i, p in enumerate(prompts):
        for j in range(3):
            reqs.append((p, specs[(i + j) % len(specs)]))
    return reqs


def test_mixed_batch_equals_each_request_alone(engine, prompts):
    reqs = _mixed_batch(prompts)
    together = _run(engine, [p for p, _ in reqs], [s for _, s in reqs])
    alone = [_run(engine, [p], [s])[0] for p, s in reqs]
    assert together == alone
    # The configs really differ: the same prompt under different specs diverges.
    by_prompt = {}
    for (p, _), toks in zip(reqs, together, strict=True):
        by_prompt.setdefault(tuple(p), set()).add(tuple(toks))
    assert sum(len(v) > 1 for v in by_prompt.values()) >= len(prompts) - 1


def test_seeded_sampling_mixed_batch_equals_alone(engine, prompts):
    from vllm import SamplingParams

    reqs = _mixed_batch(prompts)[:12]
    params = [
        SamplingParams(max_tokens=24, temperature=0.7, seed=100 + i, ignore_eos=True)
        for i in range(len(reqs))
    ]
    together = _tokens(
        engine.generate([{"prompt_token_ids": p} for p, _ in reqs], params, [s for _, s in reqs])
    )
    alone = [
        _tokens(engine.generate([{"prompt_token_ids": p}], [sp], [s]))[0]
        for (p, s), sp in zip(reqs, params, strict=True)
    ]
    assert together == alone


@pytest.fixture(scope="module")
def reference(varied_model):
    ref = HFReference(varied_model, dtype=torch.float32)
    ref.register_vectors(_vectors())
    return ref


#: eight requests over every position mode and several layers, one unsteered
MIXED_SPECS = [
    None,
    SteerSpec("ocean", 1.5, 2),
    SteerSpec("music", 3.0, 1, "generated"),
    SteerSpec("robot", 2.0, 3, "last_prompt_and_generated"),
    SteerSpec("ocean", 4.0, 0),
    SteerSpec("music", 2.5, 5, "generated"),
    SteerSpec("robot", 1.0, 4),
    SteerSpec("ocean", 6.0, 2, "last_prompt_and_generated"),
]


def assert_steering_matches_hf(engine, prompts, reference, n: int = 20) -> None:
    """Greedy tokens of `MIXED_SPECS` in one batch equal the HF reference's, and the
    steering changes at least five of the eight (so the parity is not vacuous). Shared
    with the compiled-engine module."""
    ours = _run(engine, prompts, MIXED_SPECS, _greedy(n))
    theirs = reference.generate(prompts, MIXED_SPECS, max_new_tokens=n, batch_size=8)
    assert all(len(t) == n for t in theirs)
    assert ours == theirs
    unsteered = reference.generate(prompts, [None] * len(prompts), max_new_tokens=n)
    assert sum(a != b for a, b in zip(theirs, unsteered, strict=True)) >= 5


def test_matches_hf_reference(engine, prompts, reference):
    assert_steering_matches_hf(engine, prompts, reference)


def test_prefix_caching_on_and_off_agree(engines, varied_model, engine, long_prompts):
    prompt = long_prompts[1]
    assert len(prompt) > 48
    grid = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    specs = [SteerSpec("music", a, 2, mode) for mode in POSITION_MODES for a in grid]
    # With caching: run the grid twice, the second time the prompt blocks are cached.
    first = engine.generate([{"prompt_token_ids": prompt}] * len(specs), _greedy(), specs)
    again = engine.generate([{"prompt_token_ids": prompt}] * len(specs), _greedy(), specs)
    # without prefix caching, in the test process (conftest.EngineRegistry)
    off = engines.get(varied_model, inprocess=True, enable_prefix_caching=False)
    off.register_vectors(_vectors())
    plain = off.generate([{"prompt_token_ids": prompt}] * len(specs), _greedy(), specs)
    assert _tokens(first) == _tokens(plain) == _tokens(again)
    assert len({tuple(t) for t in _tokens(plain)}) >= 4
    # KV that cannot depend on the config is shared: the repeat of a `generated` or
    # `last_prompt_and_generated` request hits the prompt's cached blocks.
    for spec, out in zip(specs, again, strict=True):
        if spec.positions != "all":
            assert out.num_cached_tokens > 0, spec


def test_all_mode_kv_is_salted_per_config(engine, long_prompts):
    """A config that steers prompt tokens never reuses another config's prompt KV."""
    prompt = {"prompt_token_ids": long_prompts[2]}
    (warm,) = engine.generate([prompt], _greedy(), [SteerSpec("robot", 1.25, 1)])
    (other,) = engine.generate([prompt], _greedy(), [SteerSpec("robot", 1.75, 1)])
    (same,) = engine.generate([prompt], _greedy(), [SteerSpec("robot", 1.25, 1)])
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens > 0
    assert list(same.outputs[0].token_ids) == list(warm.outputs[0].token_ids)


@pytest.mark.parametrize(
    "spec, field",
    [
        (SteerSpec("nope", 1.0, 1), "vector"),
        (SteerSpec("ocean", 1.0, 6), "layer"),
        (SteerSpec("ocean", 1.0, -1), "layer"),
        (SteerSpec("ocean", math.nan, 1), "alpha"),
        (SteerSpec("ocean", math.inf, 1), "alpha"),
        (SteerSpec("ocean", 1.0, 1, "prompt_only"), "positions"),
    ],
)
def test_bad_request_fails_alone_and_engine_keeps_serving(engine, prompts, spec, field):
    before = _run(engine, prompts[:2], [None, SteerSpec("ocean", 2.0, 1)])
    with pytest.raises(ValueError, match=rf"steer\[1\]\.{field}"):
        _run(engine, prompts[:2], [None, spec])
    assert _run(engine, prompts[:2], [None, SteerSpec("ocean", 2.0, 1)]) == before


@pytest.mark.parametrize(
    "vec, msg",
    [
        (torch.ones(HIDDEN + 1), "dimension 129"),
        (torch.tensor([math.nan] + [0.0] * (HIDDEN - 1)), "NaN or inf"),
        (torch.tensor([math.inf] * HIDDEN), "NaN or inf"),
    ],
)
def test_bad_vector_is_refused(engine, prompts, vec, msg):
    with pytest.raises(ValueError, match=msg):
        engine.register_vectors({"bad": vec})
    assert "bad" not in engine.vectors
    assert len(_run(engine, prompts[:1], [SteerSpec("ocean", 1.0, 1)])[0]) == NEW


def test_raw_vllm_request_with_bad_spec_is_served_unsteered(engine, prompts):
    """A request that bypasses the client's checks must not take the engine down."""
    from vllm import SamplingParams

    sp = SamplingParams(
        max_tokens=NEW,
        temperature=0.0,
        ignore_eos=True,
        extra_args={"asteer": {"v": "ghost", "a": 1.0, "l": 1, "p": "all", "fp": "x"}},
    )
    rejected = engine.info()[0]["rejected"]
    out = engine.llm.generate([{"prompt_token_ids": prompts[0]}], sp, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == _run(engine, prompts[:1], [None])[0]
    assert engine.info()[0]["rejected"] == rejected + 1


def test_rows_are_released(engine, prompts):
    _run(engine, prompts, [SteerSpec("robot", 0.1 * i, 1) for i in range(len(prompts))])
    (info,) = engine.info()
    assert info["live_requests"] == 0
    assert info["rows_in_use"] == 0
