"""Deterministic work items and shards: the same config always plans the same shards.

Resumption, `--rerun-shards` and Ray retries all rely on a shard meaning the same items
every time it is planned, so ids and seeds are pure functions of the config, and shards
are fixed-size chunks of a fixed item order. `plan_hash` summarises everything that
determines shard contents; a run folder remembers it and refuses a config that changes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..core import contract
from ..inputs.sources import Concept, Prompt, SourceUnavailable, load_concepts, load_prompts
from .config import BuildConfig
from .depth import check_layer
from .sampling import EffectiveSampling, resolve_all

__all__ = ["Item", "Shard", "Plan", "engine_hours", "item_id", "item_seed", "judge_estimate",
           "make_plan", "plan_summary", "shard_name"]

#: rough chat-template overhead per prompt, for the token estimate only
_TEMPLATE_TOKENS = 16


def item_id(model: str, method: str, concept_id: str, prompt_id: str, layer: int,
            alpha: float, sample: int) -> str:
    key = f"{model}|{method}|{concept_id}|{prompt_id}|{layer}|{alpha:.10g}|{sample}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def item_seed(policy: str, base: int, iid: str) -> int | None:
    """Per-item seeds make sampling independent of batch composition, so a shard re-run on
    another actor draws the same tokens."""
    if policy == "none":
        return None
    if policy == "fixed":
        return base
    return int(hashlib.sha256(f"{iid}|{base}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class Item:
    id: str
    model: str
    method: str
    concept_id: str
    concept: str
    concept_level: str
    prompt_id: str
    prompt: str
    layer: int
    alpha: float
    sample: int
    seed: int | None


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


@dataclass
class Shard:
    index: int
    model: str
    method: str
    items: list[Item] = field(default_factory=list)

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass
class Plan:
    config: BuildConfig
    concepts: list[Concept]
    prompts: list[Prompt]
    shards: list[Shard]
    plan_hash: str
    #: where concepts and prompts came from (Hub repo, file, revision, resolved commit),
    #: for build.json
    sources: dict = field(default_factory=dict)
    #: model name -> effective sampling (possibly unresolved: `run` refuses then)
    sampling: dict[str, EffectiveSampling] = field(default_factory=dict)

    def items(self) -> Iterator[Item]:
        for s in self.shards:
            yield from s.items

    @property
    def n_items(self) -> int:
        return sum(len(s.items) for s in self.shards)


def make_plan(cfg: BuildConfig) -> Plan:
    """All items, in (model, method, concept, prompt, alpha, sample) order, chunked into
    shards that never span two (model, method) pairs (one engine, one vector bank).

    Each model's effective sampling (`asteer_build.pipeline.sampling`) is part of the hash: a
    changed generation_config.json changes what the rollouts are, like a changed alpha.
    """
    concepts = load_concepts(cfg.concepts, cfg.base_dir)
    prompts = load_prompts(cfg.prompts, cfg.base_dir)
    s = cfg.sampling
    effective = resolve_all(cfg)
    h = hashlib.sha256()
    h.update(repr((cfg.layer, cfg.positions, cfg.shard_size, s.temperature,
                   s.max_tokens, s.seed_policy, s.seed, s.samples)).encode())
    if not cfg.prompt_format.is_default:  # other prompt tokens: other rollouts
        h.update(repr(sorted(cfg.prompt_format.chat_template_kwargs.items())).encode())
    shards: list[Shard] = []
    for m in cfg.models:
        e = effective[m.name]
        h.update(f"model|{m.name}|{m.path}|sampling|{e.temperature!r}|{e.top_k!r}|"
                 f"{e.top_p!r}".encode())
        for method in cfg.methods:
            cur: Shard | None = None
            for c in concepts:
                for p in prompts:
                    for a in cfg.alphas(m, method):
                        for k in range(s.samples):
                            iid = item_id(m.name, method, c.concept_id, p.prompt_id,
                                          cfg.layer, a, k)
                            it = Item(iid, m.name, method, c.concept_id, c.concept,
                                      c.concept_level, p.prompt_id, p.prompt, cfg.layer,
                                      float(a), k, item_seed(s.seed_policy, s.seed, iid))
                            if cur is None or len(cur.items) >= cfg.shard_size:
                                cur = Shard(len(shards), m.name, method)
                                shards.append(cur)
                            cur.items.append(it)
                            h.update(f"{iid}|{it.seed}|{c.concept}|{p.prompt}\n".encode())
    sources = {k: v for k, v in (("concepts", getattr(concepts, "origin", None)),
                                 ("prompts", getattr(prompts, "origin", None))) if v}
    return Plan(cfg, concepts, prompts, shards, h.hexdigest()[:16], sources, effective)


#: characters of each prompt that `plan --json` lists
PROMPT_PREVIEW = 120


def _load_or_expect(spec, key: str, base_dir: str) -> tuple[list | None, int, str | None]:
    """(rows, count, why not loaded): a source that is not here (file absent, Hub file
    neither cached nor reachable) counts from its `expect:`; any other problem fails."""
    loader = load_concepts if key == "concepts" else load_prompts
    try:
        rows = loader(spec, base_dir)
        return rows, len(rows), None
    except SourceUnavailable as e:
        if not (isinstance(spec, dict) and spec.get("expect") is not None):
            raise
        return None, int(spec["expect"]), str(e)


def engine_hours(rows: list[dict], expected_tokens: int, tok_s: float) -> dict:
    """Projected engine-hours of the rollouts: items x expected response tokens / tok_s.

    A GPU budget is decided before any GPU hour, from a throughput the user measured (or
    read off a benchmark) for one engine. The projection counts generated tokens only:
    prefill, engine start-up, the vectors and judge stages and retries are left out, and
    every model is assumed to run at the same `tok_s`.
    """
    if not tok_s > 0:
        raise ValueError(f"plan: --tok-s must be a positive number of tokens/s (got {tok_s})")
    per_model: dict[str, int] = {}
    for r in rows:
        per_model[r["model"]] = per_model.get(r["model"], 0) + r["items"]
    models = {m: {"items": n, "generated_tokens": n * expected_tokens,
                  "engine_hours": round(n * expected_tokens / tok_s / 3600, 2)}
              for m, n in per_model.items()}
    total_tokens = sum(x["generated_tokens"] for x in models.values())
    return {
        "tok_s": tok_s,
        "expected_response_tokens": expected_tokens,
        "by_model": models,
        "generated_tokens": total_tokens,
        "engine_hours": round(total_tokens / tok_s / 3600, 2),
        "assumptions": (
            "items x sampling.expected_tokens / tok_s / 3600, per engine; decode tokens "
            "only (no prefill, start-up, vectors or judge stages, no retries); every model "
            "at the same tok_s, useful tokens per second of one engine"),
    }


def plan_summary(cfg: BuildConfig, listing: bool = False, tok_s: float | None = None) -> dict:
    """Counts per (model, method), shards and a token estimate, without building items
    (the paper's 1.4M are cheap to count). Sources are loaded (from the Hugging Face
    cache when offline); one that is not here counts from its `expect:`, and the summary
    says so (`counts_exact` false, `sources.*.loaded` false). `listing` adds the resolved
    prompts (`prompt_id`, `source_index`, `prompt`) and concepts (`concept_id`,
    `concept`, `level`, `partition` as publish and train draw it) so a testbed can be
    checked before any GPU hour. `tok_s` adds `engine_hours` (`engine_hours`)."""
    depth = check_layer(cfg)  # a layer past a model's last block fails here, offline
    concepts, n_c, why_c = _load_or_expect(cfg.concepts, "concepts", cfg.base_dir)
    prompts, n_p, why_p = _load_or_expect(cfg.prompts, "prompts", cfg.base_dir)
    prompt_tokens = _TEMPLATE_TOKENS + 32
    if prompts:
        prompt_tokens = (_TEMPLATE_TOKENS
                         + sum(len(p.prompt) for p in prompts) // max(len(prompts), 1) // 4)
    rows = []
    total = shards = 0
    for m in cfg.models:
        for method in cfg.methods:
            n_alpha = len(cfg.alphas(m, method))
            n = n_c * n_p * n_alpha * cfg.sampling.samples
            k = -(-n // cfg.shard_size)
            rows.append({"model": m.name, "path": m.path, "method": method,
                         "concepts": n_c, "prompts": n_p, "alphas": n_alpha,
                         "items": n, "shards": k})
            total += n
            shards += k
    sources = {}
    for key, loaded, n, why in (("concepts", concepts, n_c, why_c),
                                ("prompts", prompts, n_p, why_p)):
        src = {"count": n, "loaded": loaded is not None}
        if why:
            src["not_loaded"] = why
        if loaded is not None and getattr(loaded, "origin", None):
            src["origin"] = loaded.origin
        sources[key] = src
    out = {
        "name": cfg.name,
        "items": total,
        "shards": shards,
        "shard_size": cfg.shard_size,
        "by_model_method": rows,
        "counts_exact": why_c is None and why_p is None,
        "sources": sources,
        # never fails and never goes online: a model whose generation_config.json is
        # not local shows as unresolved here (`run` reads the Hub, or refuses)
        "sampling": {n: e.as_dict() for n, e in resolve_all(cfg, network=False).items()},
        # each model's block count from its config.json (or why it is unchecked)
        "depth": depth,
        "tokens": {
            "prefill_estimate": total * prompt_tokens,
            "decode_upper_bound": total * cfg.sampling.max_tokens,
            "decode_expected": total * cfg.sampling.expected_tokens,
            "expected_response_tokens": cfg.sampling.expected_tokens,
        },
        "stages": ["vectors", "rollouts" + (" (+features, activations)" if cfg.capture
                                            else ""), "judge"],
        "judge": judge_estimate(cfg, total, prompts, concepts),
    }
    if tok_s is not None:
        out["engine_hours"] = engine_hours(rows, cfg.sampling.expected_tokens, tok_s)
    if listing:
        out["prompts"] = None if prompts is None else [
            {"prompt_id": p.prompt_id, "source_index": p.source_index,
             "prompt": p.prompt[:PROMPT_PREVIEW]} for p in prompts]
        out["concepts"] = None if concepts is None else _concept_listing(concepts)
    return out


def _concept_listing(concepts: list[Concept]) -> list[dict]:
    """Concepts in config order with the partition the default publish / train draw
    gives them (`contract.partition_concepts`: the authors' draw, seed 42)."""
    unseen = set(contract.partition_concepts({c.concept_id: c.concept_level
                                              for c in concepts}))
    return [{"concept_id": c.concept_id, "concept": c.concept, "level": c.concept_level,
             "partition": "unseen" if c.concept_id in unseen else "seen"}
            for c in concepts]


def judge_estimate(cfg: BuildConfig, calls: int, prompts: list | None,
                   concepts: list | None) -> dict:
    """The judge's tokens and cost before any call: one call per rollout (identical
    rollouts share a call, so this is an upper bound), each sending the rubric with the
    mean prompt and concept and a response of `cfg.sampling.expected_tokens` tokens, and
    answering `judge.prices.output_tokens_per_call` tokens (else `max_tokens`, else
    200). Text is counted with the judge model's tokenizer where one is available
    offline, else at 4 characters a token (`judge.estimate`); `tokenizer` says which.
    Responses are counted in the rollout model's tokens, taken as the judge's. Costs
    need `judge.prices`: live at list price, batch at `batch_discount` of it."""
    from judge import estimate

    jc = cfg.judge
    if jc.kind == "rules":
        return {"kind": "rules", "calls": calls, "note": "the rules judge makes no API calls"}
    rubric = jc.rubric(cfg.base_dir)
    mean_prompt = (sum(len(p.prompt) for p in prompts) // max(len(prompts), 1)
                   if prompts else 128)
    mean_concept = (sum(len(c.concept) for c in concepts) // max(len(concepts), 1)
                    if concepts else 24)
    per_call_in = (estimate.count_messages(rubric.messages("", "", ""), jc.model)
                   + -(-(mean_prompt + mean_concept) // estimate.CHARS_PER_TOKEN)
                   + cfg.sampling.expected_tokens)
    per_call_out = (jc.prices.output_tokens_per_call if jc.prices is not None
                    else jc.max_tokens or 200)
    out = {"kind": jc.kind, "model": jc.model, "calls": calls,
           "tokenizer": estimate.method(jc.model),
           "response_tokens_assumed": cfg.sampling.expected_tokens,
           "input_tokens_per_call": per_call_in, "output_tokens_per_call": per_call_out,
           "input_tokens": calls * per_call_in, "output_tokens": calls * per_call_out}
    if jc.prices is not None:
        live = (out["input_tokens"] * jc.prices.input_per_mtok
                + out["output_tokens"] * jc.prices.output_per_mtok) / 1e6
        out["cost_usd"] = {"live": round(live, 2),
                           "batch": round(live * jc.prices.batch_discount, 2)}
    return out
