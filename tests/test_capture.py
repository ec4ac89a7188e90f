"""Capture, exact replay and features on real vLLM (CPU) with the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asteer_build.engine import features as F
from asteer_build.engine.reference import HFReference
from asteer_build.engine.spec import CapturePair, CaptureSpec
from asteer_build.pipeline.rollouts import CaptureSettings, RolloutRequest, run_with_capture

from .capture_support import assert_captures_match_hf
from .conftest import PROMPTS, SHARED_ENGINE, chat_ids

STEPS = (0, 1, 3, 5)


def _vecs():
    g = torch.Generator().manual_seed(5)
    return {"a": torch.randn(128, generator=g), "b": torch.randn(128, generator=g)}


@pytest.fixture(scope="module")
def engine(engines, varied_model):
    # the session's shared engine: its small token budget forces chunked prefill of the
    # longer prompts
    eng = engines.get(varied_model, **SHARED_ENGINE)
    eng.register_vectors(_vecs())
    return eng


def _req(i, ids, vector="a", alpha=2.0, layer=1, mode="all", max_tokens=10, temp=0.0):
    return RolloutRequest(
        id=f"r{i}", prompt_token_ids=ids, vector=vector, alpha=alpha, layer=layer,
        positions=mode, seed=100 + i, max_tokens=max_tokens, temperature=temp,
    )


def test_states_match_hf_and_replay_is_exact(engine, varied_model):
    ids = chat_ids(varied_model, PROMPTS[:3])
    reqs = [
        _req(0, ids[0], "a", 2.0, 2, "all"),
        _req(1, ids[1], "b", 3.0, 1, "generated"),
        _req(2, ids[2], "a", 1.5, 3, "last_prompt_and_generated"),
    ]
    settings = CaptureSettings(features=False, activations=True, activation_dtype="float32",
                               extra_offsets=(-1,))
    results = run_with_capture(engine, reqs, settings)
    ref = HFReference(varied_model)
    ref.register_vectors(_vecs())
    all_offsets = assert_captures_match_hf(reqs, results, settings, ref, 6)
    for req, res, offsets in zip(reqs, results, all_offsets, strict=True):
        acts = res.activations
        P = len(req.prompt_token_ids)
        k0, km1 = offsets.index(0), offsets.index(-1)
        # layers <= L: the replay equals the steered run before the addition, exactly
        assert np.array_equal(acts["replay"][:, k0], acts["steered_pre"][:, 0])
        assert np.array_equal(acts["replay"][:, km1], acts["steered"][:, km1])
        # ...and after the addition the steered state differs where steering applies
        steered_at = [STEPS.index(t) for t in STEPS if P - 1 + t >= req.steer().start_position(P)]
        diff = acts["steered"][:, k0] - acts["steered_pre"][:, 0]
        v = req.alpha * _vecs()[req.vector].numpy()
        for i in range(len(STEPS)):
            np.testing.assert_allclose(diff[i], v if i in steered_at else 0 * v, atol=1e-5)


def test_attribution_in_a_staggered_mixed_batch(engine, varied_model):
    qs = [" ".join([PROMPTS[i % 8]] * (1 + i % 9)) for i in range(36)]
    ids = chat_ids(varied_model, qs)
    assert len({len(x) for x in ids}) >= 5 and max(map(len, ids)) > 64  # chunked
    modes = ("all", "generated", "last_prompt_and_generated")
    reqs = [
        _req(i, ids[i], "ab"[i % 2], 0.5 * (i % 7), i % 5, modes[i % 3],
             max_tokens=6 + (i % 9), temp=0.8)
        for i in range(36)
    ]
    settings = CaptureSettings()
    together = run_with_capture(engine, reqs, settings)
    alone = [run_with_capture(engine, [r], settings)[0] for r in reqs]
    for a, b in zip(together, alone, strict=True):
        assert a.response_token_ids == b.response_token_ids
        assert a.extra == b.extra
        for name in ("steered", "replay", "steered_pre"):
            np.testing.assert_allclose(a.activations[name].astype(np.float32),
                                       b.activations[name].astype(np.float32), atol=2e-3)
        fa = np.array(list(a.features.values()))
        fb = np.array(list(b.features.values()))
        np.testing.assert_allclose(fa, fb, rtol=1e-3, atol=1e-3)
    # rows really belong to different requests: steered states differ across requests
    firsts = {together[i].activations["steered"][0, 0].tobytes() for i in range(36)}
    assert len(firsts) >= 30


def test_alpha_zero_gives_zero_distance_and_finite_features(engine, varied_model):
    ids = chat_ids(varied_model, PROMPTS[:4])
    reqs = [_req(i, ids[i], "a", 0.0, i % 4, ("all", "generated")[i % 2]) for i in range(4)]
    for res in run_with_capture(engine, reqs, CaptureSettings()):
        feats = res.features
        assert all(math.isfinite(v) for v in feats.values())
        dn = [v for k, v in feats.items() if k.startswith("dn_t") and "_k" in k]
        assert dn and all(v == 0.0 for v in dn)
        # the authors' guard: a ratio over dn(t0) = 0 is 0
        assert all(feats[k] == 0.0 for k in feats if k.startswith("dnr_t") and "_k" in k)


def test_offsets_past_the_last_layer_are_dropped_and_recorded(engine, varied_model):
    ids = chat_ids(varied_model, PROMPTS[:1])
    (res,) = run_with_capture(engine, [_req(0, ids[0], layer=3)], CaptureSettings())
    assert res.extra["dropped_offsets"] == [3, 5, 10, 15]
    assert res.activations["steered"].shape == (4, 3, 128)
    assert res.activations["steered"].dtype == np.float16
    assert len(res.features) == len(F.feature_names(STEPS, [0, 1, 2]))


def test_short_response_records_missing_steps(engine, varied_model):
    ids = chat_ids(varied_model, PROMPTS[:1])
    (res,) = run_with_capture(engine, [_req(0, ids[0], max_tokens=2)], CaptureSettings())
    assert res.extra["steps_missing"] == [3, 5]
    # every rollout has the same activation shape: missing steps are zero rows
    assert res.activations["steered"].shape == (4, 4, 128)
    assert not res.activations["steered"][2:].any() and res.activations["steered"][:2].any()
    assert all(math.isfinite(v) for v in res.features.values())


def test_capture_hits_prefix_cache_and_still_gets_step_zero(engine, varied_model):
    """A replay whose block holding t = 0 is already cached must still capture t = 0.

    With 96 prompt tokens and 32-token blocks, t = 0 (position 95) is the last token of
    block [64, 96), which the steered run (mode `generated`: prompt KV unsteered, so
    shareable) cached; the replay's prompt starts with the same 96 tokens.
    """
    (long,) = chat_ids(varied_model, [" ".join([PROMPTS[2]] * 30)])
    ids = long[-96:]
    assert len(ids) == 96
    reqs = [_req(i, ids, "a", a, 2, "generated", max_tokens=8) for i, a in enumerate([1, 2])]
    first = run_with_capture(engine, reqs, CaptureSettings())
    again = run_with_capture(engine, reqs, CaptureSettings())
    for a, b in zip(first, again, strict=True):
        assert a.response_token_ids == b.response_token_ids
        assert a.extra["steps_missing"] == [] == b.extra["steps_missing"]
        np.testing.assert_array_equal(a.activations["replay"], b.activations["replay"])
    # The same replay once more, by hand: it does hit the cache for its shared prompt
    # blocks, and still gets every step.
    from vllm import SamplingParams

    replay_ids = ids + first[0].response_token_ids[:5]
    out = engine.generate(
        [{"prompt_token_ids": replay_ids}], SamplingParams(max_tokens=1), None,
        capture=[CaptureSpec("probe", (0, 1, 3, 5), base=len(ids) - 1)],
    )
    assert out[0].num_cached_tokens == 64  # [0, 64) shared; [64, 96) private to capture
    (got,) = engine.collect([CapturePair("probe", "probe", "a", 0.0, 0, (0,), (0, 1, 3, 5),
                                         features=False)])
    assert got.steps_present == (0, 1, 3, 5)


def test_pooled_prompt_states_match_hf_and_repeat_bit_identically(engine, varied_model):
    """Vectors-stage pooling: mean over positions >= 1 after block L, on the device."""
    ref = HFReference(varied_model)
    tok = ref.tokenizer
    texts = ["the ocean is very good", "music and robot friend", " ".join(["a"] * 90)]
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids for t in texts]
    assert max(map(len, ids)) > 64  # chunked over the 64-token budget
    got = engine.pool_hidden(ids, layer=2)
    assert got.shape == (3, 128) and got.dtype == np.float32
    for i, x in enumerate(ids):
        want = ref.residual_stream(x, None, [2])[2][1:].mean(0).numpy()
        np.testing.assert_allclose(got[i], want, atol=2e-5, rtol=1e-5)
    again, norms = engine.pool_hidden(ids, layer=2, with_norms=True)
    assert np.array_equal(again, got)  # bit-identical on a repeat
    for i, x in enumerate(ids):  # and each text's mean token norm, for `alpha_units: norm`
        want = ref.residual_stream(x, None, [2])[2][1:].norm(dim=-1).mean().item()
        assert norms[i] == pytest.approx(want, rel=1e-5)
    assert not np.allclose(engine.pool_hidden(ids, layer=3), got)
    with pytest.raises(ValueError, match="layer 6 out of range"):
        engine.pool_hidden(ids, layer=6)


def test_probe_feature_rows_for_online_suggestion(engine):
    """`asteer-train suggest`'s live path: short probes + replays over an alpha grid."""
    from asteer_build.pipeline.probe import probe_feature_rows

    rows = probe_feature_rows(engine, "a", ["explain the ocean", "why is coffee good"],
                              [0.0, 1.0, 4.0], layer=1, probe_tokens=6)
    assert list(rows["alpha"]) == [0.0, 1.0, 4.0] * 2
    assert set(rows["prompt"]) == {"explain the ocean", "why is coffee good"}
    names = F.feature_names(STEPS, [0, 1, 2, 3])
    assert list(rows.columns) == ["prompt", "alpha", *[n for n in names if n != "alpha"]]
    assert np.isfinite(rows[names].to_numpy()).all()
    # exact replay: before the addition at L equals the replay, so dn there is 0 for
    # every alpha; one layer up the steering shows, and SA at L (after the addition)
    # is 0 only where the vector is (alpha 0)
    assert (rows["dn_t0_k0"] == 0).all()
    assert (rows["dn_t0_k1"] == 0).sum() == 2 and (rows["dn_t0_k1"] > 0).sum() == 4
    assert (rows["sa_t0_k0"] == 0).sum() == 2
    with pytest.raises(ValueError, match="probe_tokens=3"):
        probe_feature_rows(engine, "a", ["x"], [1.0], layer=1, probe_tokens=3)


def test_feed_across_shard_boundaries_matches_one_batch(engine, varied_model):
    """The build's feeder (`feed.feed_engine`): 5 shards through a window of 7 requests,
    so shards overlap and the short ones finish before longer ones started earlier; each
    shard reaches the writer once, complete, and its rollouts and features match one
    `run_with_capture` batch of the same requests."""
    from asteer_build.pipeline.feed import ShardWriter, feed_engine
    from asteer_build.pipeline.plan import Shard

    ids = chat_ids(varied_model, [PROMPTS[i % 8] for i in range(20)])
    reqs = [_req(i, ids[i], "ab"[i % 2], 1.5, 1, max_tokens=3 + 11 * (i // 4 % 2) + i % 3,
                 temp=0.8) for i in range(20)]
    shards = [Shard(k, "tiny", "m") for k in range(5)]
    order: list[int] = []
    got: dict[int, list] = {}

    def write(shard, results):
        got[shard.index] = results
        return shard.index

    writer = ShardWriter(write, lambda shard, files: order.append(files), max_pending=2)
    stats = feed_engine(engine, ((s, reqs[4 * s.index:4 * s.index + 4]) for s in shards),
                        CaptureSettings(), 7, writer)
    writer.close()
    assert sorted(order) == [0, 1, 2, 3, 4] and len(order) == 5  # each once
    assert order != sorted(order)  # shard 1 (long) commits after shard 2 (short)
    assert stats.items == 20 and stats.shards == 5 and stats.generate_seconds > 0
    flat = [r for k in range(5) for r in got[k]]
    assert [r.id for r in flat] == [r.id for r in reqs]
    assert stats.tokens == sum(r.response_tokens for r in flat)
    batch = run_with_capture(engine, reqs, CaptureSettings())
    for a, b in zip(flat, batch, strict=True):
        assert a.response_token_ids == b.response_token_ids and a.extra == b.extra
        np.testing.assert_allclose(np.array(list(a.features.values())),
                                   np.array(list(b.features.values())), rtol=1e-3, atol=1e-3)


def test_feed_without_capture_matches_one_batch(engine, varied_model):
    from asteer_build.pipeline.feed import ShardWriter, feed_engine
    from asteer_build.pipeline.plan import Shard
    from asteer_build.pipeline.rollouts import run_rollouts

    ids = chat_ids(varied_model, [PROMPTS[i % 8] for i in range(12)])
    reqs = [_req(i, ids[i], "ab"[i % 2], 1.0, 1, max_tokens=2 + 3 * (i % 5), temp=0.8)
            for i in range(12)]
    got: dict[int, list] = {}
    writer = ShardWriter(lambda s, res: got.setdefault(s.index, res))
    stats = feed_engine(engine, ((Shard(k, "tiny", "m"), reqs[3 * k:3 * k + 3])
                                 for k in range(4)), None, 5, writer)
    writer.close()
    flat = [r for k in range(4) for r in got[k]]
    want = run_rollouts(engine, reqs)
    assert [(r.id, r.response_token_ids) for r in flat] == \
        [(r.id, r.response_token_ids) for r in want]
    assert stats.items == 12 and stats.tokens == sum(r.response_tokens for r in want)


class _Borrowed:
    """The module's engine, lent to a `FeedThread` (which shuts down what it owns)."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def shutdown(self) -> None:
        pass


def test_feed_thread_takes_shards_while_running_and_fails_one_on_write_error(
        engine, varied_model):
    """The Ray actor's feeding (`feed.FeedThread`): shards handed in from an event loop two
    at a time, as the driver does, run on the same `feed_engine` loop as the local
    executor's and match one `run_with_capture` batch. A shard whose write fails raises
    in its caller alone and runs again when handed in again (the driver's retry); an
    engine that fails to start fails `started` and every later shard."""
    import asyncio

    from asteer_build.pipeline.feed import FeedThread
    from asteer_build.pipeline.plan import Shard

    ids = chat_ids(varied_model, [PROMPTS[i % 8] for i in range(15)])
    reqs = [_req(i, ids[i], "ab"[i % 2], 1.5, 1, max_tokens=2 + 9 * (i % 2) + i % 4,
                 temp=0.8) for i in range(15)]
    shards = [Shard(k, "tiny", "m") for k in range(5)]
    written: dict[int, list] = {}
    fail_once = {2}

    def write(shard, results):
        if shard.index in fail_once:
            fail_once.discard(shard.index)
            raise OSError("disk full (injected)")
        written[shard.index] = results
        return f"files-{shard.index}"

    async def drive(feeder):
        assert (await feeder.started())._engine is engine
        got, errors, pending = {}, [], list(shards)
        running: set[asyncio.Task] = set()
        while pending or running:
            while pending and len(running) < 2:
                s = pending.pop(0)
                t = asyncio.create_task(feeder.run_shard(s, reqs[3 * s.index:3 * s.index + 3]))
                t.shard = s
                running.add(t)
            done, running = await asyncio.wait(running, timeout=120,
                                               return_when=asyncio.FIRST_COMPLETED)
            assert done, "the feeder hung"
            for t in done:
                if t.exception() is not None:
                    errors.append((t.shard.index, str(t.exception())))
                    pending.append(t.shard)  # the driver's retry
                else:
                    got[t.shard.index] = t.result()
        return got, errors

    feeder = FeedThread(lambda: _Borrowed(engine), CaptureSettings(), 4, write)
    try:
        got, errors = asyncio.run(drive(feeder))
        feeder.check()  # still healthy
    finally:
        feeder.close()
    assert errors == [(2, "disk full (injected)")]
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert got[2] == ("files-2", sum(r.response_tokens for r in written[2]))
    flat = [r for k in range(5) for r in written[k]]
    assert [r.id for r in flat] == [r.id for r in reqs]
    assert feeder.stats.items == 18 and feeder.stats.shards == 6  # shard 2 ran twice
    assert not feeder.thread.is_alive()
    batch = run_with_capture(engine, reqs, CaptureSettings())
    for a, b in zip(flat, batch, strict=True):
        assert a.response_token_ids == b.response_token_ids
        np.testing.assert_allclose(np.array(list(a.features.values())),
                                   np.array(list(b.features.values())), rtol=1e-3, atol=1e-3)

    def no_engine():
        raise RuntimeError("no such model (injected)")

    broken = FeedThread(no_engine, None, 4, write)
    with pytest.raises(RuntimeError, match="engine feeder failed.*no such model"):
        asyncio.run(broken.started())
    with pytest.raises(RuntimeError, match="engine feeder failed"):
        asyncio.run(broken.run_shard(shards[0], reqs[:3]))
    broken.close()
