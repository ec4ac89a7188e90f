"""Features as the reference authors define them, and their replay, on real vLLM (CPU).

One engine for the module, on a tiny world deep enough (17 blocks, steered layer 1) that
every default offset L + {0, 1, 2, 3, 5, 10, 15} exists, so a rollout has all 414
columns. The reference definitions are written out here again, in numpy and in the
authors' own names and column order, from research notes (paper-notes.md, "Early hidden
states and features"; fidelity-gaps.md sections 2 and 3), not from our features code.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from asteer_build.core.feature_names import authors_columns, authors_name, authors_names
from asteer_build.engine import features as F
from asteer_build.pipeline.rollouts import (
    CaptureSettings,
    RolloutRequest,
    authors_response_text,
    replay_activations,
    run_with_capture,
)

from .conftest import PROMPTS, chat_ids

LAYER = 1
STEPS = [0, 1, 3, 5]
OFFSETS = [0, 1, 2, 3, 5, 10, 15]
HIDDEN = 128
SETTINGS = CaptureSettings(activation_dtype="float32")


def _vecs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {"a": 0.5 * torch.randn(HIDDEN, generator=g), "b": torch.randn(HIDDEN, generator=g)}


@pytest.fixture(scope="module")
def deep_model() -> str:
    from asteer_build.inputs.tinyworld import TinyWorldSpec, build_tiny_model

    return str(build_tiny_model(TinyWorldSpec(num_layers=17)))


@pytest.fixture(scope="module")
def engine(engines, deep_model):
    """In the test process (conftest.EngineRegistry): nothing here needs the engine core
    in a process of its own."""
    eng = engines.get(deep_model, inprocess=True, max_num_seqs=32)
    eng.register_vectors(_vecs())
    return eng


def _requests(model: str) -> list[RolloutRequest]:
    """Sampled rollouts over alphas, both vectors, two position modes (in `generated`
    step 0 is not steered, so dn(t0) is 0 at every layer) and one response too short
    for steps 3 and 5."""
    prompts = PROMPTS[:4]
    ids = chat_ids(model, prompts)
    reqs = []
    for i, (p, x) in enumerate(zip(prompts, ids, strict=True)):
        for j, alpha in enumerate([0.0, 1.5, 6.0]):
            reqs.append(RolloutRequest(
                id=f"q{i}-{j}", prompt_token_ids=x, vector="ab"[(i + j) % 2], alpha=alpha,
                layer=LAYER, positions="generated" if (i, j) == (1, 2) else "all",
                seed=7 + 3 * i + j, max_tokens=2 if (i, j) == (2, 1) else 10,
                temperature=1.0, prompt=p,
            ))
    return reqs


@pytest.fixture(scope="module")
def exact_run(engine, deep_model):
    reqs = _requests(deep_model)
    return reqs, run_with_capture(engine, reqs, SETTINGS)


@pytest.fixture(scope="module")
def authors_run(engine, deep_model):
    reqs = _requests(deep_model)
    return reqs, run_with_capture(engine, reqs, replace(SETTINGS, replay="authors"))


# ---- the reference definitions, independently -----------------------------------------
def reference_features(post, pre, replay, v_c, alpha, layer, steps, offsets, missing):
    """The authors' feature vector as {their name: value}, in their column order.

    `post` [T, K, H]: steered states (at k = 0 after the addition); `pre` [T, H]: steered
    at L before the addition; `replay` [T, K, H]; `missing`: steps a side lacks (their
    cells stay 0). Per (t, l): MagDiff ||h~ - h||, CosSim cos(h~, h) with h~ the
    before-addition state at L; SteerAlign cos(h~ - h, v) without L; SteerProj cos(h~, v)
    with the after-addition state at L; v = alpha v_c; cosines of vectors of norm <= 1e-8
    are 0. Dynamics against t0: ratio (0 where MagDiff(t0) <= 1e-8), deltas. Each matrix:
    entries, Mean/Std (population)/Max/Min, per token and per layer Mean/Std/Max. Then
    InterventionMag = ||after - before at (t0, L)|| / alpha, and Alpha.
    """
    eps = 1e-8
    post, pre, replay = (np.asarray(x, np.float64) for x in (post, pre, replay))
    v = alpha * np.asarray(v_c, np.float64)

    def cos(a, b):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return float(a @ b / (na * nb)) if na > eps and nb > eps else 0.0

    nt, nl = len(steps), len(offsets)
    mag, sim, align, proj = (np.zeros((nt, nl)) for _ in range(4))
    for ti, t in enumerate(steps):
        if t in missing:
            continue
        for li, k in enumerate(offsets):
            before = pre[ti] if k == 0 else post[ti, li]
            after = post[ti, li]
            mag[ti, li] = np.linalg.norm(before - replay[ti, li])
            sim[ti, li] = cos(before, replay[ti, li])
            align[ti, li] = cos(before - replay[ti, li], v)
            proj[ti, li] = cos(after, v)
    ratio = np.zeros((nt - 1, nl))
    for ti in range(1, nt):
        for li in range(nl):
            if abs(mag[0, li]) > eps:
                ratio[ti - 1, li] = mag[ti, li] / mag[0, li]
    sim_delta = sim[1:] - sim[0]
    align_delta = align[1:] - align[0]
    not_l = [li for li, k in enumerate(offsets) if k != 0]
    t_names = [f"T{t}" for t in steps]
    l_names = [f"L{layer + k}" for k in offsets]

    out: dict[str, float] = {}

    def emit(metric, m, ts, ls, over):
        for i, t in enumerate(ts):
            for j, lname in enumerate(ls):
                out[f"{metric}_{t}_{lname}"] = m[i, j]
        flat = m.ravel()
        for stat, fn in (("Mean", np.mean), ("Std", np.std), ("Max", np.max), ("Min", np.min)):
            out[f"{metric}_{stat}_Global"] = fn(flat)
        for i, t in enumerate(ts):
            row = m[i]
            out[f"{metric}_Mean_{t}_AllLayers"] = row.mean()
            out[f"{metric}_Std_{t}_AllLayers"] = row.std()
            out[f"{metric}_Max_{t}_AllLayers"] = row.max()
        for j, lname in enumerate(ls):
            col = m[:, j]
            out[f"{metric}_Mean_{lname}_{over}"] = col.mean()
            out[f"{metric}_Std_{lname}_{over}"] = col.std()
            out[f"{metric}_Max_{lname}_{over}"] = col.max()

    lx = [l_names[j] for j in not_l]
    emit("MagDiff", mag, t_names, l_names, "AllTokens")
    emit("CosSim", sim, t_names, l_names, "AllTokens")
    emit("SteerAlign", align[:, not_l], t_names, lx, "AllTokens")
    emit("SteerProj", proj, t_names, l_names, "AllTokens")
    emit("MagDiffRatio", ratio, t_names[1:], l_names, "AllNonZeroTokens")
    emit("CosSimDelta", sim_delta, t_names[1:], l_names, "AllNonZeroTokens")
    emit("SteerAlignDelta", align_delta[:, not_l], t_names[1:], lx, "AllNonZeroTokens")
    mag_t0 = np.linalg.norm(post[0, 0] - pre[0])
    out["InterventionMag"] = mag_t0 / alpha if alpha else mag_t0
    out["Alpha"] = float(alpha)
    return out


def _check_against_reference(req: RolloutRequest, res, vecs) -> int:
    """Every column of `res.features` equals the reference; returns how many."""
    acts = res.activations
    v_c = vecs[req.vector].numpy()
    ref = reference_features(acts["steered"], acts["steered_pre"][:, 0], acts["replay"],
                             v_c, req.alpha, LAYER, STEPS, OFFSETS,
                             set(res.extra["steps_missing"]))
    assert authors_columns(LAYER) == list(ref)  # their names, their order
    ours = res.features
    assert len(ours) == 414
    for name, value in ours.items():
        if name == "vector_norm":
            # ours is ||v_c|| always; theirs is read off the states at (t0, L), the same
            # up to float32 rounding wherever t0 is steered (not at alpha 0: theirs is 0)
            assert value == pytest.approx(float(np.linalg.norm(v_c)), rel=1e-6)
            if req.alpha and req.positions == "all":
                assert value == pytest.approx(ref["InterventionMag"], rel=1e-4)
            continue
        assert value == pytest.approx(ref[authors_name(name, LAYER)], rel=1e-5, abs=1e-5), name
    return len(ours)


# ---- tests -----------------------------------------------------------------------------
def test_engine_features_equal_the_reference_definitions_on_all_414_columns(exact_run):
    reqs, results = exact_run
    vecs = _vecs()
    assert results[7].extra["steps_missing"] == [3, 5]  # the short one
    for req, res in zip(reqs, results, strict=True):
        assert res.extra["dropped_offsets"] == []
        assert _check_against_reference(req, res, vecs) == 414
        # the public tensor function on the same states gives the same row
        acts = res.activations
        again = F.compute_named(
            torch.from_numpy(acts["steered"]), torch.from_numpy(acts["replay"]),
            vecs[req.vector], req.alpha, STEPS, OFFSETS,
            steered_pre=torch.from_numpy(acts["steered_pre"][:, 0]))
        np.testing.assert_allclose(list(again.values()), list(res.features.values()),
                                   rtol=1e-6, atol=1e-6)


def test_exact_replay_makes_the_steered_layer_columns_constant(exact_run):
    reqs, results = exact_run
    for req, res in zip(reqs, results, strict=True):
        f = res.features
        for t in STEPS:
            assert f[f"dn_t{t}_k0"] == 0.0, (req.id, t)  # before the addition == replay
        for t in STEPS[1:]:
            assert f[f"dnr_t{t}_k0"] == 0.0  # the authors' guard: dn(t0) is 0
        present = [t for t in STEPS if t not in res.extra["steps_missing"]]
        for t in present:
            assert f[f"ds_t{t}_k0"] == pytest.approx(1.0, abs=1e-6)
            if req.alpha and (t > 0 or req.positions == "all"):
                assert f[f"sa_t{t}_k0"] != 0.0  # SA at L reads the after-addition state
                assert f[f"dn_t{t}_k1"] > 0.0
    # position mode `generated`: t0 is not steered, so dn(t0) = 0 everywhere and every
    # ratio takes the guard
    gen = results[[r.positions for r in reqs].index("generated")].features
    assert all(gen[f"dn_t0_k{k}"] == 0.0 for k in OFFSETS)
    assert all(gen[f"dnr_t{t}_k{k}"] == 0.0 for t in STEPS[1:] for k in OFFSETS)
    assert gen["dn_t1_k1"] > 0.0


def test_authors_replay_gives_nonzero_distance_at_the_steered_layer(authors_run, engine):
    reqs, results = authors_run
    vecs = _vecs()
    for req, res in zip(reqs, results, strict=True):
        f = res.features
        present = [t for t in STEPS if t not in res.extra["steps_missing"]]
        assert present[:1] == [0]
        for t in present:
            assert f[f"dn_t{t}_k0"] > 0.0, (req.id, t)  # template mismatch, even at alpha 0
            assert f[f"ds_t{t}_k0"] < 1.0
        assert all(math.isfinite(v) for v in f.values())
        _check_against_reference(req, res, vecs)


def test_authors_replay_states_are_the_untemplated_text_at_their_positions(
        authors_run, deep_model):
    """The replay's states equal an HF forward over prompt + cleaned response text,
    tokenized with the tokenizer's own special tokens, at len(tokens(prompt)) - 1 + t."""
    from transformers import AutoTokenizer

    from asteer_build.engine.reference import HFReference

    reqs, results = authors_run
    tok = AutoTokenizer.from_pretrained(deep_model)
    ref = HFReference(deep_model)
    layers = [LAYER + k for k in OFFSETS]
    for req, res in list(zip(reqs, results, strict=True))[::3]:
        text = tok.decode(res.response_token_ids, skip_special_tokens=True).strip()
        full = tok(req.prompt + text)["input_ids"]
        start = len(tok(req.prompt)["input_ids"]) - 1
        # the chat template's special tokens are not in it; the prompt's words are
        assert full[: start + 1] != req.prompt_token_ids[: start + 1]
        plain = ref.residual_stream(full, None, layers)
        for ti, t in enumerate(STEPS):
            if start + t >= len(full):
                assert t in res.extra["steps_missing"]
                continue
            want = np.stack([plain[layer][start + t].numpy() for layer in layers])
            np.testing.assert_allclose(res.activations["replay"][ti], want,
                                       atol=2e-4, rtol=1e-4)


def test_replay_activations_reproduce_each_mode_on_one_steered_pass(engine, exact_run,
                                                                    authors_run):
    """The benchmark's path (one steered pass, replays run again) gives the same states
    as each mode's own run."""
    for (reqs, results), mode in ((exact_run, "exact"), (authors_run, "authors")):
        again = replay_activations(engine, reqs, results, SETTINGS, replay=mode)
        for res, (states, present) in zip(results, again, strict=True):
            keep = [i for i, t in enumerate(STEPS) if t in present
                    and t not in res.extra["steps_missing"]]
            np.testing.assert_allclose(states[keep], res.activations["replay"][keep],
                                       atol=1e-5, rtol=1e-5)


def test_authors_replay_needs_prompt_text_and_a_known_mode(engine, deep_model):
    (req,) = _requests(deep_model)[:1]
    with pytest.raises(ValueError, match=r"capture.replay=authors needs .*q0-0"):
        run_with_capture(engine, [replace(req, prompt=None)],
                         replace(SETTINGS, replay="authors"))
    with pytest.raises(ValueError, match="capture.replay: expected one of exact, authors"):
        CaptureSettings(replay="author")


def test_authors_response_text_cleans_as_theirs():
    assert authors_response_text("  hello there \n") == "hello there"
    assert authors_response_text("user\nhi\nassistant\n  the answer ") == "the answer"
    assert authors_response_text("x\nmodel\ny\nassistant\nz") == "y\nassistant\nz"


def test_feature_name_mapping_to_the_authors():
    m = authors_names(10)
    assert len(m) == 414 and len(set(m.values())) == 414
    assert m["dn_t1_k1"] == "MagDiff_T1_L11"
    assert m["da_t0_k15"] == "SteerAlign_T0_L25"
    assert m["sa_std"] == "SteerProj_Std_Global"
    assert m["ds_t3_max"] == "CosSim_Max_T3_AllLayers"
    assert m["dnr_k0_mean"] == "MagDiffRatio_Mean_L10_AllNonZeroTokens"
    assert m["dad_t5_k2"] == "SteerAlignDelta_T5_L12"
    assert m["vector_norm"] == "InterventionMag" and m["alpha"] == "Alpha"
    cols = authors_columns(10)
    assert cols[-2:] == ["InterventionMag", "Alpha"]
    assert cols[:-2] == [m[n] for n in list(m)[:-2]]
    with pytest.raises(ValueError, match="not a builder feature"):
        authors_name("response_tokens", 10)


def test_replay_mode_is_a_config_field_in_the_hash():
    from asteer_build.pipeline.config import ConfigError, parse_config
    from asteer_build.pipeline.plan import make_plan
    from asteer_build.pipeline.work import ModelContext, shard_requests

    from .pipeline_support import tiny_config

    exact = parse_config(tiny_config(None, capture={"steps": [0, 1, 3, 5]}))
    authors = parse_config(tiny_config(None, capture={"steps": [0, 1, 3, 5],
                                                      "replay": "authors"}))
    assert exact.capture.replay == "exact"
    assert authors.capture.replay == "authors"
    assert exact.config_hash() != authors.config_hash()
    with pytest.raises(ConfigError, match="capture.replay"):
        parse_config(tiny_config(None, capture={"replay": "raw"}))
    # the planned requests carry the prompt text the authors' replay re-tokenizes
    plan = make_plan(authors)
    shard = plan.shards[0]
    ctx = ModelContext(authors.models[0], "unused", {}, {},
                       {p.prompt_id: [1, 2, 3] for p in plan.prompts},
                       plan.sampling[authors.models[0].name])
    reqs = shard_requests(authors, ctx, shard)
    assert [r.prompt for r in reqs] == [it.prompt for it in shard.items]
