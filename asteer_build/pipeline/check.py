"""`asteer-build check`: does steering do, on my model and this machine, what the
reference does, and how long will my build take?

A researcher bringing a model we never tested wants both answers before spending
GPU-hours. The check loads the model twice, on the steered vLLM engine with the config's
engine arguments and on the Hugging Face reference (`engine.reference`, `generate()` plus
a forward hook: how the reference testbed was made), then, on a handful of prompts and
for every position mode, checks:

- `alpha_zero`: alpha 0 gives the unsteered tokens, exactly (the same batch, so no
  kernel choice can differ);
- `mixed_batch`: each steered request in one batch with other configs and unsteered
  requests gives the tokens it gives alone;
- `reference_tokens`: greedy steered tokens agree with the reference's, each request up
  to the dtype's agreement length (all tokens in float32; 16-bit rounding makes long
  greedy runs drift, so there the first divergence step is reported and the first 4
  must agree);
- `reference_states`: the residual stream the build captures (steered, and the exact
  unsteered replay) equals the reference's over the same tokens, relative to the
  stream's size, within the dtype's tolerance;
- `steering_changes_output`: the check is not vacuous (steering moves most outputs);
- `runner`: the runner adapter in use, whether hooks run graph-safe and whether CUDA
  graphs were captured (reported; fails only when no adapter took the runner).

The steering vectors are random directions scaled to the mean residual-stream norm at
the layer (measured on the reference over the check's prompts), so alphas 0.5 and 1
mean the same push on every model. Then a short throughput run at the config's shape
(its batch, sampling, capture and replay) gives tokens/s, plugged into `plan`'s
projection: "this config: ~N engine-hours on this machine".

Each check can be seen to fail: the test seam's `check_break` (`core.testseam`) breaks
the addition, the position mode, the capture layer or the mixed batch inside the engine.
Without vLLM (a GPU machine that only has PyTorch) the reference half runs and the
engine checks are reported as not run.
"""

from __future__ import annotations

import importlib.metadata
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.contract import DEFAULT_OFFSETS, DEFAULT_STEPS
from ..core.paths import cache_dir
from ..engine.spec import POSITION_MODES, SteerSpec
from .config import BuildConfig, ConfigError, ModelConfig, load_config
from .records import CaptureSettings, RolloutRequest

__all__ = ["CheckOptions", "run_check", "report_path", "CHECK_PROMPTS"]

#: used when the config's prompts are not here (a Hub source offline)
CHECK_PROMPTS = (
    "explain the ocean to a friend",
    "write a short story about a robot",
    "list three reasons to travel",
    "how can we learn music in school",
    "what is a good plan for the day",
    "write a poem about winter",
)
#: strengths in units of the mean residual norm at the layer (vector norm = that mean)
ALPHAS = (0.5, 1.0)
#: per dtype: (greedy steps that must agree with the reference, state tolerance relative
#: to the stream's largest entry)
TOLERANCE = {"float32": (None, 1e-3), "bfloat16": (4, 5e-2), "float16": (4, 1e-2)}


@dataclass
class CheckOptions:
    config: str = "asteer-paper"
    #: a config model's name, or a path / Hub id (engine arguments then from the
    #: config's first model); None: the config's only model
    model: str | None = None
    device: str | None = None
    tp: int | None = None
    layer: int | None = None
    prompts: int = 4
    new_tokens: int = 16
    #: throughput run: requests (None: the engine's max_num_seqs, at most 256; 0: skip)
    throughput_requests: int | None = None
    throughput_tokens: int = 128
    reference_only: bool = False
    out: Path | None = None


@dataclass
class _Setup:
    """What both halves share: the model, its reference, the prompts and the batch."""

    opts: CheckOptions
    cfg: BuildConfig
    mcfg: ModelConfig
    path: str
    engine_args: dict[str, Any]
    layer: int
    agree: int
    state_tol: float
    ref: Any
    vectors: dict[str, Any]
    prompts: list[list[int]]
    specs: list[SteerSpec | None]
    batch_prompts: list[list[int]]
    ref_tokens: list[list[int]] = field(default_factory=list)
    plain_tokens: list[list[int]] = field(default_factory=list)


def run_check(opts: CheckOptions) -> dict[str, Any]:
    """Run every check; returns the report (`passed`, `failed`: the failing checks'
    names). The report is written to `opts.out` (default under the user's cache)."""
    import torch

    from ..engine.reference import HFReference
    from ..inputs.tinyworld.names import resolve_model_path

    cfg = load_config(opts.config)
    mcfg = _pick_model(cfg, opts)
    path = resolve_model_path(mcfg.path)
    engine_args = dict(mcfg.engine_args)
    if mcfg.tensor_parallel_size > 1:
        engine_args["tensor_parallel_size"] = mcfg.tensor_parallel_size
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = _dtype_name(engine_args.get("dtype"), path)
    agree, state_tol = TOLERANCE[dtype_name]
    agree = opts.new_tokens if agree is None else min(agree, opts.new_tokens)
    layer = cfg.layer if opts.layer is None else opts.layer

    t0 = time.perf_counter()
    ref = HFReference(path, dtype=getattr(torch, dtype_name), device=device)
    num_layers = int(ref.model.config.num_hidden_layers)
    if not 0 <= layer < num_layers:
        raise ConfigError(f"check: layer {layer} is not a block of {mcfg.path} "
                          f"({num_layers} layers: 0..{num_layers - 1})")
    from ..core.prompts import prompt_ids

    texts = _prompt_texts(cfg, opts.prompts)
    prompts = [prompt_ids(ref.tokenizer, t, cfg.prompt_format) for t in texts]
    # the residual norm as `alpha_units: norm` measures it (each text's mean token norm,
    # position 0 skipped, averaged over texts), here over the check's prompts
    from ..vectors.pooling import hf_pooler

    norm = float(hf_pooler(ref)(prompts, layer)[1].mean(dtype=np.float64))
    g = torch.Generator().manual_seed(0)
    vectors = {}
    for name in ("v0", "v1"):
        d = torch.randn(ref.model.config.hidden_size, generator=g)
        vectors[name] = d / d.norm() * norm
    ref.register_vectors(vectors)
    specs = _mixed_batch(len(prompts), layer)
    batch_prompts = [prompts[i % len(prompts)] for i in range(len(specs))]
    report: dict[str, Any] = {
        "model": mcfg.path, "model_path": path, "config": cfg.name, "layer": layer,
        "num_layers": num_layers, "device": _device_name(device), "dtype": dtype_name,
        "engine_args": engine_args, "prompts": texts, "new_tokens": opts.new_tokens,
        "residual_norm": norm, "alphas_in_norm_units": list(ALPHAS),
        "tolerance": {"agree_steps": agree, "state_rel": state_tol},
        "versions": _versions(), "checks": {}, "reference": {},
    }
    su = _Setup(opts, cfg, mcfg, path, engine_args, layer, agree, state_tol, ref, vectors,
                prompts, specs, batch_prompts)
    su.ref_tokens = ref.generate(batch_prompts, specs, max_new_tokens=opts.new_tokens,
                                 batch_size=8)
    su.plain_tokens = ref.generate(prompts, None, max_new_tokens=opts.new_tokens)
    report["reference"] = _reference_half(su)
    report["timings"] = {"reference_s": round(time.perf_counter() - t0, 2)}
    checks = report["checks"]
    checks["steering_changes_output"] = report["reference"].pop("steering_changes_output")

    if opts.reference_only:
        report["engine"] = {"run": False, "why": "--reference-only"}
    else:
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            report["engine"] = {"run": False, "why": f"vLLM is not installed ({e})"}
            checks["engine"] = {"pass": False, "error": report["engine"]["why"]}
        else:
            _engine_half(su, report)
    failed = [k for k, c in checks.items() if not c.get("pass")]
    failed += [f"reference.{k}" for k, c in report["reference"].items()
               if isinstance(c, dict) and c.get("pass") is False]
    report["failed"] = failed
    report["passed"] = not failed
    out = opts.out or report_path(mcfg.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    report["report_path"] = str(out)
    return report


def report_path(model: str) -> Path:
    """Where a report goes by default: the user's cache, never the source tree."""
    return cache_dir() / "check" / f"check-{_slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}.json"


# ---- the pieces ------------------------------------------------------------------------
def _pick_model(cfg: BuildConfig, opts: CheckOptions) -> ModelConfig:
    names = {m.name: m for m in cfg.models}
    if opts.model is None:
        if len(cfg.models) != 1:
            raise ConfigError(f"check: config {cfg.name!r} has {len(cfg.models)} models; "
                              f"name one with --model ({', '.join(names)}) or give a path")
        m = cfg.models[0]
    elif opts.model in names:
        m = names[opts.model]
    else:  # the user's own model, with the engine arguments of the config's first
        m = replace(cfg.models[0], name=_slug(opts.model), path=opts.model)
    if opts.tp is not None:
        if opts.tp < 1:
            raise ValueError(f"check: --tp must be >= 1 (got {opts.tp})")
        m = replace(m, tensor_parallel_size=opts.tp)
    return m


def _dtype_name(dtype: Any, path: str) -> str:
    """The engine's dtype as torch names it; `auto` / unset is the checkpoint's (float32
    checkpoints stay float32, as vLLM does on CPU for the tiny world)."""
    name = str(dtype or "auto").replace("torch.", "")
    if name in ("auto", "None"):
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(path)
        name = str(getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
                   or "float32").replace("torch.", "")
    name = {"half": "float16", "float": "float32", "bf16": "bfloat16"}.get(name, name)
    if name not in TOLERANCE:
        raise ConfigError(f"check: engine_args.dtype {dtype!r} is not one of "
                          f"{', '.join(TOLERANCE)}")
    return name


def _prompt_texts(cfg: BuildConfig, n: int) -> list[str]:
    """The config's first n prompts when they are here, else the built-in ones."""
    from ..inputs.sources import SourceUnavailable, load_prompts

    try:
        rows = load_prompts(cfg.prompts, cfg.base_dir)
        texts = [r.prompt for r in rows[:n]]
    except SourceUnavailable:
        texts = []
    return texts if len(texts) == n else list(CHECK_PROMPTS[:n])


def _mixed_batch(n_prompts: int, layer: int) -> list[SteerSpec | None]:
    """Every position mode on every prompt, vectors and strengths alternating, then each
    prompt unsteered: one batch of distinct configs."""
    specs: list[SteerSpec | None] = []
    for k, mode in enumerate(POSITION_MODES):
        for i in range(n_prompts):
            specs.append(SteerSpec(f"v{i % 2}", ALPHAS[(i // 2 + k) % 2], layer, mode))
    return specs + [None] * n_prompts


def _divergence(a: list[int], b: list[int]) -> int | None:
    """The first step where two greedy runs differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _agreement(got: list[list[int]], want: list[list[int]], agree: int) -> dict[str, Any]:
    div = [_divergence(a, b) for a, b in zip(got, want, strict=True)]
    worst = [d for d in div if d is not None and d < agree]
    return {"pass": not worst, "first_divergence": div, "requests": len(div),
            "diverged_before_agree_steps": len(worst)}


def _label(spec: SteerSpec | None) -> str:
    return "unsteered" if spec is None else f"{spec.vector} a={spec.alpha} {spec.positions}"


def _reference_half(su: _Setup) -> dict[str, Any]:
    """What runs without vLLM: the reference agrees with itself (alpha 0, batch vs
    alone), and steering moves the output at these strengths."""
    ref, prompts, specs, n = su.ref, su.prompts, su.specs, su.opts.new_tokens
    batch_prompts, ref_tokens, plain_tokens = su.batch_prompts, su.ref_tokens, su.plain_tokens
    zero_equal = all(
        ref.generate(prompts, [SteerSpec("v0", 0.0, specs[0].layer, m)] * len(prompts),
                     max_new_tokens=n) == plain_tokens for m in POSITION_MODES)
    alone = [ref.generate([p], [s], max_new_tokens=n)[0]
             for p, s in zip(batch_prompts, specs, strict=True) if s is not None]
    steered = [t for t, s in zip(ref_tokens, specs, strict=True) if s is not None]
    moved = sum(t != plain_tokens[i % len(prompts)] for i, t in enumerate(steered))
    return {
        "alpha_zero": {"pass": zero_equal},
        "mixed_batch": _agreement(steered, alone, su.agree),
        "steering_changes_output": {
            "pass": moved * 2 >= len(steered), "moved": moved, "steered": len(steered),
            "why": "steering must move most greedy outputs, or the checks prove nothing"},
    }


def _engine_half(su: _Setup, report: dict[str, Any]) -> None:
    from vllm import SamplingParams

    from ..engine import SteeredEngine

    checks = report["checks"]
    n, layer, agree = su.opts.new_tokens, su.layer, su.agree
    prompts, specs, batch_prompts = su.prompts, su.specs, su.batch_prompts
    t0 = time.perf_counter()
    eng = SteeredEngine(su.path, **su.engine_args)
    report["timings"]["engine_start_s"] = round(time.perf_counter() - t0, 2)
    try:
        eng.register_vectors(su.vectors)
        greedy = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

        def run(ps, ss):
            outs = eng.generate([{"prompt_token_ids": p} for p in ps], greedy, ss)
            return [list(o.outputs[0].token_ids) for o in outs]

        plain = run(prompts, [None] * len(prompts))
        modes = {}
        for mode in POSITION_MODES:
            zero = run(prompts, [SteerSpec("v0", 0.0, layer, mode)] * len(prompts))
            modes[mode] = [_divergence(a, b) for a, b in zip(zero, plain, strict=True)]
        checks["alpha_zero"] = {
            "pass": all(d is None for v in modes.values() for d in v),
            "first_divergence_by_mode": modes}
        mixed = run(batch_prompts, specs)
        steered_idx = [i for i, s in enumerate(specs) if s is not None]
        alone = [run([batch_prompts[i]], [specs[i]])[0] for i in steered_idx]
        checks["mixed_batch"] = {**_agreement([mixed[i] for i in steered_idx], alone, agree),
                                 "configs": [_label(specs[i]) for i in steered_idx]}
        checks["reference_tokens"] = {**_agreement(mixed, su.ref_tokens, agree),
                                      "configs": [_label(s) for s in specs],
                                      "unsteered_equal": plain == su.plain_tokens}
        checks["reference_states"] = _states(eng, su)
        checks["runner"] = _runner(eng)
        report["throughput"] = _throughput(eng, su)
    finally:
        eng.shutdown()
    report["timings"]["engine_s"] = round(time.perf_counter() - t0, 2)


def _states(eng, su: _Setup) -> dict[str, Any]:
    """The build's capture path (`run_with_capture`: steered rows, exact replay) against
    the reference's block outputs over the same tokens."""
    from .rollouts import run_with_capture

    cfg, layer, n, ref, tol = su.cfg, su.layer, su.opts.new_tokens, su.ref, su.state_tol

    base = cfg.capture or CaptureSettings()
    steps = tuple(s for s in (base.steps or DEFAULT_STEPS) if s < n) or (0,)
    settings = CaptureSettings(steps=steps, offsets=base.offsets or DEFAULT_OFFSETS,
                               features=False, activations=True, activation_dtype="float32",
                               extra_offsets=(-1,) if layer > 0 else ())
    reqs = [RolloutRequest(id=f"check{i}", prompt_token_ids=p, vector=s.vector,
                           alpha=s.alpha, layer=s.layer, positions=s.positions, seed=i,
                           max_tokens=n, temperature=0.0)
            for i, (p, s) in enumerate(zip(su.batch_prompts, su.specs, strict=True)) if s]
    results = run_with_capture(eng, reqs, settings)
    worst: dict[str, float] = {}
    per_layer: dict[int, float] = {}
    for req, res in zip(reqs, results, strict=True):
        offsets = sorted({*settings.extra_offsets,
                          *settings.resolve(req.layer, eng.num_layers)[0]})
        layers = [req.layer + k for k in offsets]
        full = req.prompt_token_ids + res.response_token_ids
        P = len(req.prompt_token_ids)
        pos = [P - 1 + t for t in steps if P - 1 + t < len(full)]
        for kind, spec in (("steered", req.steer()), ("replay", None)):
            want = ref.residual_stream(full, spec, layers, prompt_len=P)
            got = res.activations[kind]
            for j, lay in enumerate(layers):
                w = np.stack([want[lay][p].numpy() for p in pos])
                g = got[: len(pos), j].astype(np.float32)
                rel = float(np.abs(g - w).max() / max(1e-6, float(np.abs(w).max())))
                worst[kind] = max(worst.get(kind, 0.0), rel)
                per_layer[lay] = max(per_layer.get(lay, 0.0), rel)
    return {"pass": all(v <= tol for v in worst.values()), "max_rel_diff": worst,
            "max_rel_diff_by_layer": {str(k): v for k, v in sorted(per_layer.items())},
            "tolerance": tol, "steps": list(steps), "requests": len(reqs)}


def _runner(eng) -> dict[str, Any]:
    """Which adapter took the runner and whether graphs were captured (vLLM's own
    compilation config, read where this version has it)."""
    infos = eng.info()
    comp = getattr(getattr(eng.llm.llm_engine, "vllm_config", None), "compilation_config",
                   None)
    mode = str(getattr(comp, "cudagraph_mode", None))
    sizes = list(getattr(comp, "cudagraph_capture_sizes", None) or [])
    eager = bool(eng.llm.llm_engine.model_config.enforce_eager)
    graphs = not eager and mode not in ("None", "NONE", "CUDAGraphMode.NONE") and bool(sizes)
    return {"pass": all(i.get("adapter") for i in infos),
            "adapter": [i.get("adapter") for i in infos],
            "graph_safe_hooks": [i.get("graph_safe_hooks") for i in infos],
            "enforce_eager": eager, "cudagraph_mode": mode,
            "cudagraph_capture_sizes": sizes[:8] + (["..."] if len(sizes) > 8 else []),
            "graphs_captured": graphs}


def _throughput(eng, su: _Setup) -> dict[str, Any] | None:
    """A short run at the config's shape (batch, sampling, capture and replay), and the
    plan's engine-hours at the measured rate."""
    from .plan import plan_summary
    from .rollouts import run_with_capture

    cfg, opts, prompts, layer = su.cfg, su.opts, su.prompts, su.layer

    n_req = opts.throughput_requests
    if n_req is None:
        n_req = min(256, int(su.engine_args.get("max_num_seqs") or 256))
    if n_req <= 0:
        return None
    tokens = min(cfg.sampling.max_tokens, opts.throughput_tokens)
    reqs = [RolloutRequest(id=f"tp{i}", prompt_token_ids=prompts[i % len(prompts)],
                           vector=f"v{i % 2}", alpha=ALPHAS[i % 2], layer=layer,
                           positions=cfg.positions, seed=i, max_tokens=tokens,
                           temperature=cfg.sampling.temperature, ignore_eos=True)
            for i in range(n_req)]
    capture = cfg.capture
    t0 = time.perf_counter()
    if capture is not None:
        results = run_with_capture(eng, reqs, capture)
        generated = sum(r.response_tokens for r in results)
    else:
        from .records import sampling_params

        outs = eng.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs],
                            [sampling_params(r) for r in reqs], [r.steer() for r in reqs])
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
    wall = time.perf_counter() - t0
    tok_s = generated / wall
    plan = plan_summary(cfg, tok_s=tok_s)
    return {"requests": n_req, "tokens_per_request": tokens, "generated_tokens": generated,
            "wall_s": round(wall, 2), "tok_s": round(tok_s, 1),
            "capture": capture is not None, "engine_hours": plan["engine_hours"]}


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return device


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("vllm", "torch", "transformers", "asteer"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"
