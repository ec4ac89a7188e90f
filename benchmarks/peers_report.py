"""What `bench_peers.py` reports beyond its raw rounds: each tool's definition of
steering, EasySteer's published figures, the paired ratios, where each tool's time goes
and the side-by-side table. Pure functions over the rounds; nothing here runs an engine."""

from __future__ import annotations

import statistics

EASYSTEER_PUBLISHED = {
    "status": "published, not measured",
    "why": "a vLLM 0.26 fork, on no package registry (the registry name `easysteer` is an "
           "unrelated client); figures as the authors publish them (issue 29)",
    "hardware": "RTX PRO 6000, batch 256",
    "series_plain": {"plain_tokens_per_s": 33217, "one_layer_steered_tokens_per_s": 29622,
                     "steered_over_plain": round(29622 / 33217, 3)},
    "series_k": {"baseline": "its own zero-strength run, 30,633 tok/s",
                 "tokens_per_s": {"k1": 23211, "k32": 15851, "k256": 5620},
                 "over_zero_strength": {"k1": round(23211 / 30633, 3),
                                        "k32": round(15851 / 30633, 3),
                                        "k256": round(5620 / 30633, 3)},
                 "k256_over_k1": round(5620 / 23211, 3)},
    "capture": "not published",
}

STEERING_DEFINITIONS = {
    "ours": "alpha * v (pre-scaled in float32, cast to the model dtype) added to the "
            "`hidden` half of decoder block `layer`'s (hidden, residual) output, i.e. to "
            "the residual stream after block `layer`; positions by mode, here `all` "
            "(every prompt and generated token); one table row per distinct config, one "
            "gather-add per steered layer and step",
    "vllm_lens": "SteeringVector(activations [1, H], layer_indices [layer], scale, "
                 "norm_match False): `v.to(dtype) * scale` added to output[0] (the same "
                 "`hidden` half) of decoder layer `layer` by a PyTorch forward hook; 2-D "
                 "activations broadcast to every position of the request's slice (= our "
                 "`all`); the hook loops over the batch's requests in Python and, per "
                 "request, over every registered steering entry",
    "hotwire_vllm": "`hidden[tok] += scale * bank[slot]` (computed in float32) on "
                    "hidden_states (output[0]) of each *DecoderLayer, by a Triton custom "
                    "op; every position by default (= our `all`), `decode_only` skips "
                    "multi-token spans",
    "common_definition": "add alpha * v to the residual stream after block `layer` at "
                         "every position of the request: the three tools define it the "
                         "same way; in bfloat16 they round differently (ours "
                         "bf16(alpha * v), vllm-lens bf16(bf16(v) * alpha), hotwire "
                         "bf16(h + alpha * v) in float32), so the token check runs in "
                         "float32 and uses alpha = 2 (a power of two: exact in any dtype)",
}


def ratios_of(rounds: dict, variants: list[str]) -> dict:
    from benchmarks.common import paired_summary

    plain, k_many, k1, cap = variants
    out: dict = {}
    for tool, vs in rounds.items():
        r: dict = {}
        p = len(vs.get(plain, []))
        for v in (k1, k_many, cap):
            if v in vs and len(vs[v]) == p and p:
                r[f"{v}_over_plain"] = paired_summary(vs[plain], vs[v])
        if k_many in vs and k1 in vs and len(vs[k_many]) == len(vs[k1]):
            r[f"{k_many.split('_')[1]}_over_k1"] = paired_summary(vs[k1], vs[k_many])
        if cap in vs and k_many in vs and len(vs[cap]) == len(vs[k_many]):
            r["capture_over_steered"] = paired_summary(vs[k_many], vs[cap])
        out[tool] = r
    return out


def where_time_goes(ratios: dict, secs: dict, variants: list[str]) -> dict:
    """Flags every figure where a peer's median ratio beats ours by more than our own
    round-to-round spread, and says where each tool's time goes."""
    ours = ratios.get("ours", {})
    flags = []
    for tool, r in ratios.items():
        if tool == "ours":
            continue
        for fig, s in r.items():
            o = ours.get(fig)
            if o is None:
                continue
            spread = o["ratio_max"] - o["ratio_min"]
            if s["ratio_median"] > o["ratio_median"] + spread:
                flags.append({"tool": tool, "figure": fig, "peer_median": s["ratio_median"],
                              "ours_median": o["ratio_median"], "ours_spread": round(spread, 3)})
    extra = {}
    for tool, vs in secs.items():
        plain = vs.get(variants[0])
        if not plain:
            continue
        p = statistics.median(plain)
        extra[tool] = {v: round(statistics.median(x) - p, 2) for v, x in vs.items()
                       if v != variants[0]}
    return {
        "peer_ahead_of_ours_beyond_our_spread": flags,
        "seconds_over_plain_median": extra,
        "mechanisms": {
            "ours": "per step, one host pass over the batch builds a token -> table-row "
                    "index (numpy, vectorized); each steered layer adds `tables[row_index]` "
                    "(one gather-add over all tokens); capture: one index_select of the "
                    "selected tokens per layer into a fixed buffer, drained to host once "
                    "per step; collect() fetches only the asked steps",
            "vllm_lens": "per layer and step, a Python loop over the batch's requests "
                         "looks up each request's steering entries (scanning every entry "
                         "registered: O(requests x entries)), clones the layer output and "
                         "adds the vector to each request's slice; one RPC per steered "
                         "request to ship its pickled vectors before generate (and one "
                         "to clear it after); steered requests skip reading the prefix "
                         "cache; capture copies every position of every layer of every "
                         "request to host with one .cpu() per (request, layer, step), "
                         "returned pickled",
            "hotwire_vllm": "a Triton kernel per decoder layer reads a token -> slot map "
                            "filled per step in Python from the scheduler's spans; keeps "
                            "CUDA graphs (GPU only)",
        },
        "note": "flags compare a peer's median paired ratio with ours; the spread is our "
                "own max - min paired ratio for the same figure",
    }


def side_by_side(models: dict, tools: dict) -> list[dict]:
    rows = []
    for tool in ("ours", "vllm_lens", "hotwire_vllm"):
        row: dict = {"tool": tool, "runs_here": bool(tools[tool].get("measure"))}
        if not tools[tool].get("measure"):
            row["status"] = tools[tool]["status"]
        for mk, sec in models.items():
            r = sec.get("ratios", {}).get(tool, {})
            row[mk] = {fig: f"{s['ratio_median']} ({s['ratio_min']}-{s['ratio_max']})"
                       for fig, s in r.items()}
            if tool in sec.get("status", {}) and "error" in sec["status"][tool]:
                row[mk]["error"] = sec["status"][tool]["error"]
        rows.append(row)
    es = EASYSTEER_PUBLISHED
    rows.append({"tool": "easysteer", "runs_here": False, "status": es["status"],
                 "published": {"steered_over_plain": es["series_plain"]["steered_over_plain"],
                               "k256_over_zero_strength": es["series_k"]["over_zero_strength"][
                                   "k256"], "k256_over_k1": es["series_k"]["k256_over_k1"]}})
    return rows


def inside_peer(tb: str | None, package: str) -> bool | None:
    """Whether the innermost frames of a traceback are the peer's own code."""
    if not tb:
        return None
    frames = [ln for ln in tb.splitlines() if ln.strip().startswith("File ")]
    return any(f"/{package}/" in f for f in frames[-3:])
