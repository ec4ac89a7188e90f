"""Strength-search costs and success rates on a toy grid computed by hand.

Grid: alphas 1..5, probe_tokens = 6 (so 30 probe tokens per item), one concept c1.
Item A = (c1, p1): labels 0 0 1 1 2, P(success) .10 .50 .30 .80 .20, tokens 100 120 200 220 400
Item B = (c1, p2): labels 0 0 0 2 2, P(success) .05 .10 .20 .15 .02, tokens 90 110 130 500 600
Mean length L = (100+120+200+220+400+90+110+130+500+600) / 10 = 2470 / 10 = 247.
"""

import pandas as pd
import pytest

from train.search import build_items, evaluate_search, predictor_guided

ALPHAS = [1.0, 2.0, 3.0, 4.0, 5.0]


def toy_rows() -> pd.DataFrame:
    a = {
        "label": [0, 0, 1, 1, 2],
        "p_success": [0.10, 0.50, 0.30, 0.80, 0.20],
        "response_tokens": [100, 120, 200, 220, 400],
    }
    b = {
        "label": [0, 0, 0, 2, 2],
        "p_success": [0.05, 0.10, 0.20, 0.15, 0.02],
        "response_tokens": [90, 110, 130, 500, 600],
    }
    rows = []
    for prompt, item in (("p1", a), ("p2", b)):
        for i, alpha in enumerate(ALPHAS):
            rows.append(
                {
                    "concept_id": "c1",
                    "prompt_id": prompt,
                    "alpha": alpha,
                    **{k: v[i] for k, v in item.items()},
                }
            )
    # Shuffled on purpose: the search must sort by alpha itself.
    return pd.DataFrame(rows).sample(frac=1.0, random_state=3).reset_index(drop=True)


def toy_calibration() -> pd.DataFrame:
    """Other prompts of c1. p1 and p2 (the evaluated prompts) succeed at alpha 4, p3 at
    alpha 2. Item A may only use p2, p3 (tie 2 vs 4 -> smaller alpha 2, label 0 -> fail);
    item B only p1, p3 (alpha 2 -> fail). Using its own prompt would give A alpha 4."""
    labels = {"p1": [0, 0, 0, 1, 0], "p2": [0, 0, 0, 1, 0], "p3": [0, 1, 0, 0, 0]}
    return pd.DataFrame(
        [
            {"concept_id": "c1", "prompt_id": p, "alpha": a, "label": lab[i]}
            for p, lab in labels.items()
            for i, a in enumerate(ALPHAS)
        ]
    )


def by_method(result):
    return {r["method"]: r for r in result["table"]}


def test_mean_length_is_the_mean_of_all_rows():
    _, mean_len = build_items(toy_rows())
    assert mean_len == 247.0


def test_toy_grid_table_matches_hand_computation():
    res = evaluate_search(toy_rows(), toy_calibration(), ks=(1, 2, 5), taus=(0.0, 0.5))
    t = by_method(res)
    # (success rate, mean tokens per item, mean rollouts per item), computed by hand:
    expected = {
        # A: top alpha 4 succeeds: 30 + 247 = 277. B: alpha 3 fails: 277.
        "ours@K=1": (0.5, 277.0, 1.0),
        # B: alphas 3, 4 fail: 30 + 2 * 247 = 524 -> (277 + 524) / 2
        "ours@K=2": (0.5, 400.5, 1.5),
        # B: all five fail: 30 + 5 * 247 = 1265 -> (277 + 1265) / 2
        "ours@K=5": (0.5, 771.0, 3.0),
        # TCGS: alpha 2 for both (see toy_calibration), 1 rollout each
        "TCGS": (0.0, 247.0, 1.0),
        # CGS: success rate per alpha over A, B: a3 = a4 = .5 -> alpha 3: A yes, B no
        "CGS": (0.5, 247.0, 1.0),
        # IGS: 5 rollouts each, 5 * 247 = 1235
        "IGS": (0.5, 1235.0, 5.0),
        # IGS-A: A stops at alpha 3 (3 x 247 = 741), B tries all (1235)
        "IGS-A": (0.5, 988.0, 4.0),
        # IGS-D: A stops at alpha 4 (2 x 247 = 494), B 1235
        "IGS-D": (0.5, 864.5, 3.5),
    }
    assert set(t) == set(expected)
    for name, (succ, tokens, rollouts) in expected.items():
        assert t[name]["success_rate"] == succ, name
        assert t[name]["mean_tokens"] == tokens, name
        assert t[name]["mean_rollouts"] == rollouts, name
    assert t["ours@K=2"]["tokens_vs_igs"] == 400.5 / 1235.0
    assert t["ours@K=2"]["success_vs_igs"] == 1.0
    assert res["items"] == 2
    assert res["cost_model"]["mean_length"] == 247.0


def test_tau_skips_items_but_charges_their_probes():
    items, _ = build_items(toy_rows())
    # tau = 0.5: A (max .8) is attempted, B (max .2) skipped -> 30 probe tokens only.
    r = predictor_guided(items, k=5, tau=0.5, probe_tokens=6)
    assert (r["success_rate"], r["mean_tokens"], r["mean_rollouts"]) == (0.5, 153.5, 0.5)
    assert r["attempted_fraction"] == 0.5
    # tau above every probability: nothing decoded, probes still paid.
    r = predictor_guided(items, k=5, tau=0.9, probe_tokens=6)
    assert (r["success_rate"], r["mean_tokens"], r["mean_rollouts"]) == (0.0, 30.0, 0.0)


def test_pareto_front_keeps_only_undominated_points():
    res = evaluate_search(toy_rows(), toy_calibration(), ks=(1, 2, 5), taus=(0.0, 0.5))
    # Sweep: tau 0 gives (277 | 400.5 | 771, .5); tau .5 gives (153.5, .5) for every K.
    assert len(res["tau_sweep"]) == 6
    front = res["pareto"]
    assert {p["tau"] for p in front} == {0.5}
    assert [p["mean_tokens"] for p in front] == [153.5, 153.5, 153.5]


def test_actual_lengths_charge_the_decoded_rows():
    res = evaluate_search(toy_rows(), toy_calibration(), ks=(2,), taus=(0.0,), length="actual")
    t = by_method(res)
    # A: alpha 4 (220) -> 250; B: alphas 3 (130) and 4 (500) -> 660; mean 455.
    assert t["ours@K=2"]["mean_tokens"] == 455.0
    # IGS: A 1040, B 1430; TCGS: alpha 2 -> A 120, B 110.
    assert t["IGS"]["mean_tokens"] == 1235.0
    assert t["TCGS"]["mean_tokens"] == 115.0
    # IGS-A: A 100+120+200 = 420, B 1430 -> 925; IGS-D: A 400+220 = 620, B 1430 -> 1025.
    assert t["IGS-A"]["mean_tokens"] == 925.0
    assert t["IGS-D"]["mean_tokens"] == 1025.0


def test_probe_tokens_change_only_the_guided_cost():
    a = by_method(
        evaluate_search(toy_rows(), toy_calibration(), ks=(1,), taus=(0.0,), probe_tokens=6)
    )
    b = by_method(
        evaluate_search(toy_rows(), toy_calibration(), ks=(1,), taus=(0.0,), probe_tokens=10)
    )
    assert b["ours@K=1"]["mean_tokens"] - a["ours@K=1"]["mean_tokens"] == 5 * 4
    assert b["IGS"]["mean_tokens"] == a["IGS"]["mean_tokens"]


def test_missing_probabilities_and_duplicate_alphas_are_errors():
    rows = toy_rows().drop(columns=["p_success"])
    items, _ = build_items(rows)
    with pytest.raises(ValueError, match="p_success"):
        predictor_guided(items, k=1)
    dup = pd.concat([toy_rows(), toy_rows().iloc[:1]])
    with pytest.raises(ValueError, match="several rows for one alpha"):
        build_items(dup)
