"""The one feeding state machine (`pipeline.feeder.Feeder`) and the typed capture records
at the engine boundary (`engine.spec`): `run_with_capture` is a one-shard feed, the
records survive their RPC dict form, and bad records are refused with a message naming
the field and value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asteer_build.engine.spec import CapturePair, CaptureSpec, CollectResult
from asteer_build.pipeline.records import (
    CaptureSettings,
    RolloutRequest,
    capture_pair,
    replay_spec,
    steered_capture,
)

STEPS = (0, 1, 3, 5)


# ---- the records and their wire form (no engine) ---------------------------------------
def test_capture_spec_wire_form_is_the_dict_the_worker_reads():
    steered = steered_capture(CaptureSettings(), "r0:abc:s")
    assert steered.to_wire() == {"key": "r0:abc:s", "steps": [0, 1, 3, 5]}  # no base
    req = RolloutRequest("r0", [5, 6, 7], "a", 2.0, 1)
    ids, replay = replay_spec(req, [8, 9, 10, 11, 12, 13, 14], CaptureSettings(), "r0:abc:r")
    assert ids == [5, 6, 7, 8, 9, 10, 11, 12]
    assert replay.to_wire() == {"key": "r0:abc:r", "steps": [0, 1, 3, 5], "base": 2}
    # a rollout of one token reaches step 0 only; the spec is still a valid record
    _, short = replay_spec(req, [8], CaptureSettings(), "k")
    assert short == CaptureSpec("k", (0,), 2)
    for spec in (steered, replay, short, CaptureSpec("k", ())):
        assert CaptureSpec.from_wire(spec.to_wire()) == spec


def test_capture_pair_from_settings_and_back():
    req = RolloutRequest("r1", [1, 2], "b", 3, 4)
    pair = capture_pair(req, ("s", "r"), CaptureSettings(), num_layers=6)
    # offsets past the 6-block model's last block are dropped, not sent
    assert pair == CapturePair("s", "r", "b", 3.0, 4, (0, 1), STEPS, True, True, "float16")
    wire = pair.to_wire()
    assert wire == {"steered": "s", "replay": "r", "vector": "b", "alpha": 3.0, "layer": 4,
                    "offsets": [0, 1], "steps": [0, 1, 3, 5], "features": True,
                    "activations": True, "activation_dtype": "float16"}
    assert isinstance(wire["alpha"], float) and CapturePair.from_wire(wire) == pair
    inspect = CaptureSettings(features=False, extra_offsets=(-1,), activation_dtype="float32")
    got = capture_pair(req, ("s", "r"), inspect, num_layers=6)
    assert got.offsets == (-1, 0, 1) and not got.features
    at0 = capture_pair(RolloutRequest("r2", [1], "b", 1.0, 0), ("s", "r"), inspect, 6)
    assert at0.offsets == (0, 1, 2, 3, 5)  # L - 1 does not exist at layer 0


def test_collect_result_round_trip_keeps_the_bytes():
    g = np.random.default_rng(3)
    feats = g.standard_normal(414).astype(np.float32)
    acts = {"steered": g.standard_normal((4, 7, 16)).astype(np.float16),
            "replay": g.standard_normal((4, 7, 16)).astype(np.float16),
            "steered_pre": g.standard_normal((4, 1, 16)).astype(np.float16)}
    res = CollectResult((0, 1, 3), True, feats, acts)
    wire = res.to_wire()
    assert wire["steps_present"] == [0, 1, 3] and wire["overflow"] is True
    assert wire["features"] == {"shape": [414], "dtype": "float32", "data": feats.tobytes()}
    back = CollectResult.from_wire(wire)
    assert back.steps_present == (0, 1, 3) and back.overflow and back.error is None
    assert back.features.dtype == np.float32 and back.features.tobytes() == feats.tobytes()
    assert list(back.activations) == ["steered", "replay", "steered_pre"]
    for k, v in acts.items():
        assert back.activations[k].shape == v.shape
        assert back.activations[k].tobytes() == v.tobytes()
    bare = CollectResult.from_wire({"steps_present": [], "overflow": False,
                                    "error": "unknown vector 'x'"})
    assert bare.features is None and bare.activations is None
    assert bare.error == "unknown vector 'x'"


BAD_RECORDS = [
    (lambda: CaptureSpec("", (0,)), "capture.key: expected a non-empty string, got ''"),
    (lambda: CaptureSpec("k", (3, 1)), r"capture.steps: must be strictly increasing, got \[3, 1\]"),
    (lambda: CaptureSpec("k", (0, 64)), r"capture.steps: values must lie in 0..63, got \[0, 64\]"),
    (lambda: CaptureSpec("k", (0, 1.5)), "capture.steps: expected an int, got 1.5"),
    (lambda: CaptureSpec("k", "01"), "capture.steps: expected a sequence of ints, got '01'"),
    (lambda: CaptureSpec("k", (0,), -1), "capture.base: must be >= 0, got -1"),
    (lambda: CaptureSpec.from_wire({"key": "k", "step": [0]}),
     r"capture: unknown field\(s\) \['step'\]"),
    (lambda: CaptureSpec.from_wire(["k", [0]]), "capture: expected a dict, got list"),
    (lambda: CapturePair("s", "r", "a", float("nan"), 1, (0,), STEPS),
     "pair.alpha: expected a finite number, got nan"),
    (lambda: CapturePair("s", "r", "a", True, 1, (0,), STEPS),
     "pair.alpha: expected a finite number, got True"),
    (lambda: CapturePair("s", "r", "a", 1.0, -1, (0,), STEPS), "pair.layer: must be >= 0, got -1"),
    (lambda: CapturePair("s", "r", "a", 1.0, 0, (-1, 0), STEPS, features=False),
     "pair.offsets: layer 0 \\+ offset -1 is below block 0"),
    (lambda: CapturePair("s", "r", "a", 1.0, 2, (1, 2), STEPS),
     r"pair.offsets: features need offset 0 \(the steered layer\), got \[1, 2\]"),
    (lambda: CapturePair("s", "r", "a", 1.0, 2, (0,), ()), "pair.steps: must not be empty"),
    (lambda: CapturePair("s", "r", None, 1.0, 2, (0,), STEPS),
     "pair.vector: expected a non-empty string, got None"),
    (lambda: CapturePair("s", "r", "a", 1.0, 2, (0,), STEPS, activation_dtype="int8"),
     "pair.activation_dtype: expected one of .*, got 'int8'"),
    (lambda: CapturePair("s", "r", "a", 1.0, 2, (0,), STEPS, activations="yes"),
     "pair.activations: expected a bool, got 'yes'"),
    (lambda: CollectResult.from_wire({"steps_present": [0], "overflow": False,
                                      "features": {"shape": [3], "dtype": "float32",
                                                   "data": b"\0" * 8}}),
     r"collected.features: not a wired array"),
]


@pytest.mark.parametrize("make, message", BAD_RECORDS,
                         ids=[f"bad{i}" for i in range(len(BAD_RECORDS))])
def test_bad_records_are_refused_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- the machine, on the varied tiny model (vLLM CPU) ----------------------------------
@pytest.fixture(scope="module")
def engine(engines, varied_model):
    """The session's shared tiny-world engine (conftest.SHARED_ENGINE); this module's
    vectors have names of their own, so the modules sharing it keep theirs."""
    from .conftest import SHARED_ENGINE

    g = torch.Generator().manual_seed(5)
    eng = engines.get(varied_model, **SHARED_ENGINE)
    eng.register_vectors({"fa": torch.randn(128, generator=g),
                          "fb": torch.randn(128, generator=g)})
    return eng


def _reqs(model: str, n: int) -> list[RolloutRequest]:
    from .conftest import PROMPTS, chat_ids

    ids = chat_ids(model, [PROMPTS[i % 8] for i in range(n)])
    return [RolloutRequest(f"r{i}", ids[i], ("fa", "fb")[i % 2], 1.5, 1 + i % 3,
                           positions=("all", "generated")[i % 5 == 4], seed=40 + i,
                           max_tokens=2 + 5 * (i % 3), temperature=0.8) for i in range(n)]


def test_run_with_capture_is_a_one_shard_feed(engine, varied_model):
    """The same requests through `run_with_capture` and through `feed_engine` as one
    shard with everything in flight give the same rows to the last byte; an empty shard
    between two others is handed on at once instead of being reported incomplete."""
    from asteer_build.pipeline.feed import ShardWriter, feed_engine
    from asteer_build.pipeline.plan import Shard
    from asteer_build.pipeline.rollouts import run_with_capture

    reqs = _reqs(varied_model, 10)
    settings = CaptureSettings(activation_dtype="float32")
    batch = run_with_capture(engine, reqs, settings)
    got: dict[int, list] = {}
    writer = ShardWriter(lambda s, res: got.setdefault(s.index, res))
    stats = feed_engine(engine, [(Shard(0, "tiny", "m"), reqs)], settings, len(reqs), writer)
    writer.close()
    assert stats.items == 10 and stats.shards == 1
    assert [r.id for r in batch] == [r.id for r in got[0]] == [r.id for r in reqs]
    for a, b in zip(batch, got[0], strict=True):
        assert a.response_token_ids == b.response_token_ids and a.response == b.response
        assert a.finish_reason == b.finish_reason and a.extra == b.extra
        assert list(a.features) == list(b.features)
        np.testing.assert_array_equal(np.array(list(a.features.values())),
                                      np.array(list(b.features.values())))
        for k in ("steered", "replay", "steered_pre"):
            np.testing.assert_array_equal(a.activations[k], b.activations[k])
    assert {r.extra["steps_missing"] == [] for r in batch} == {True, False}  # short ones
    assert run_with_capture(engine, [], settings) == []

    got.clear()
    writer = ShardWriter(lambda s, res: got.setdefault(s.index, res))
    shards = [(Shard(0, "tiny", "m"), reqs[:2]), (Shard(1, "tiny", "m"), []),
              (Shard(2, "tiny", "m"), reqs[2:4])]
    stats = feed_engine(engine, shards, None, 3, writer)
    writer.close()
    assert sorted(got) == [0, 1, 2] and got[1] == [] and stats.shards == 3
    assert [r.response_token_ids for r in got[0] + got[2]] == \
        [r.response_token_ids for r in batch[:4]]


def test_engine_refuses_untyped_or_out_of_range_records(engine, varied_model):
    from vllm import SamplingParams

    from asteer_build.engine import SteerSpec

    ids = _reqs(varied_model, 1)[0].prompt_token_ids
    with pytest.raises(TypeError, match="capture\\[0\\]: expected CaptureSpec or None, got dict"):
        engine.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1),
                        [SteerSpec("fa", 1.0, 1)], capture=[{"key": "k", "steps": [0]}])
    with pytest.raises(TypeError, match="pairs\\[0\\]: expected CapturePair, got dict"):
        engine.collect([CapturePair("s", "r", "fa", 1.0, 1, (0,), STEPS).to_wire()])
    with pytest.raises(ValueError, match="pairs\\[1\\] \\(s2\\): layer 3 \\+ offset 3 = 6 is "
                                         "past the model's last block 5"):
        engine.collect([CapturePair("s1", "r1", "fa", 1.0, 1, (0,), STEPS),
                        CapturePair("s2", "r2", "fa", 1.0, 3, (0, 3), STEPS)])
    # the engine still serves: a capture under a typed spec comes back typed
    (out,) = engine.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=4),
                             [SteerSpec("fa", 1.0, 1)], capture=[CaptureSpec("k", (0, 1))])
    (got,) = engine.collect([CapturePair("k", "k", "fa", 1.0, 1, (0, 1), (0, 1))])
    assert isinstance(got, CollectResult) and got.steps_present == (0, 1)
    assert got.features is not None and got.features.dtype == np.float32
    assert got.activations is None and got.error is None
