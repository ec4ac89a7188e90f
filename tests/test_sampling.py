"""Effective sampling per model (asteer_build.pipeline.sampling): the config's temperature, top-k /
top-p from the model's generation_config.json where the config leaves them unset, else
transformers' defaults; recorded per model in build.json, hashed into the plan, and the
exact values the engine samples with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from asteer_build.pipeline.build import BuildRefused, RunOptions, prepare_run
from asteer_build.pipeline.config import ConfigError, parse_config
from asteer_build.pipeline.plan import make_plan, plan_summary
from asteer_build.pipeline.sampling import FROM_CONFIG, FROM_DEFAULT, FROM_MODEL, resolve_sampling

from .conftest import chat_ids
from .pipeline_support import ENGINE_ARGS, cli, tiny_config, write_config

pytestmark = pytest.mark.timeout(600)


def _set_generation_config(folder: Path, **values) -> None:
    """Merge sampling keys into a model folder's generation_config.json, as a model's
    authors would ship them."""
    f = folder / "generation_config.json"
    data = json.loads(f.read_text()) if f.exists() else {}
    f.write_text(json.dumps({**data, **values}, indent=2))


@pytest.fixture(scope="module")
def gen_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny world with a generation_config.json that sets top_k 1 and top_p 0.5 (and a
    repetition penalty, which a build does not apply and must say so)."""
    folder = tmp_path_factory.mktemp("gen") / "tiny-gen"
    shutil.copytree(tiny_model, folder)
    _set_generation_config(folder, top_k=1, top_p=0.5, temperature=0.6,
                           repetition_penalty=1.1)
    return folder


def _two_models(out: Path, gen_model: Path, **over) -> dict:
    cfg = tiny_config(out, **over)
    cfg["models"] = [
        {"name": "tiny", "path": "tinyworld", "engine_args": dict(ENGINE_ARGS)},
        {"name": "gen", "path": str(gen_model), "engine_args": dict(ENGINE_ARGS)},
    ]
    return cfg


@pytest.mark.parametrize("sampling, msg", [
    ({"top_k": -1}, r"sampling.top_k: must be an int >= 1, or 0 for no top-k"),
    ({"top_k": 2.5}, r"sampling.top_k: expected an integer"),
    ({"top_p": 0}, r"sampling.top_p: must be > 0"),
    ({"top_p": 1.5}, r"sampling.top_p: must be <= 1"),
])
def test_bad_sampling_values_name_the_field(tmp_path, sampling, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(tiny_config(tmp_path, sampling=sampling))


def test_unset_is_the_model_file_else_transformers_defaults(gen_model, tmp_path):
    cfg = parse_config(_two_models(tmp_path, gen_model,
                                   sampling={"temperature": 0.7, "max_tokens": 8}))
    assert cfg.sampling.top_k is None and cfg.sampling.top_p is None  # unset, not 1.0
    tiny, gen = (resolve_sampling(cfg.sampling, m) for m in cfg.models)
    # The tiny world's file is silent: transformers' defaults, as generate() applies.
    assert (tiny.temperature, tiny.top_k, tiny.top_p) == (0.7, 50, 1.0)
    assert tiny.source == {"temperature": FROM_CONFIG, "top_k": FROM_DEFAULT,
                           "top_p": FROM_DEFAULT}
    # The model's file wins where the config is unset; temperature is always the
    # config's (the reference passes it to generate()).
    assert (gen.temperature, gen.top_k, gen.top_p) == (0.7, 1, 0.5)
    assert gen.source == {"temperature": FROM_CONFIG, "top_k": FROM_MODEL, "top_p": FROM_MODEL}
    assert gen.generation_config == str(gen_model / "generation_config.json")
    assert gen.not_applied == {"repetition_penalty": 1.1}
    # An explicit value overrides the file, key by key.
    over = parse_config(_two_models(tmp_path, gen_model, sampling={"top_k": 7}))
    g = resolve_sampling(over.sampling, over.models[1])
    assert (g.top_k, g.top_p) == (7, 0.5) and g.source["top_k"] == FROM_CONFIG
    assert g.source["top_p"] == FROM_MODEL


def test_build_json_records_sampling_and_a_changed_file_refuses_resume(gen_model, tmp_path):
    from asteer_build.pipeline.rollouts import sampling_params
    from asteer_build.pipeline.work import ModelContext, shard_requests

    folder = tmp_path / "gen-copy"
    shutil.copytree(gen_model, folder)
    out = tmp_path / "run"
    # (sampled: vLLM drops top-k / top-p from greedy params)
    raw = _two_models(out, folder, sampling={"temperature": 0.5, "max_tokens": 16})
    run = prepare_run(parse_config(raw, base_dir=str(tmp_path)), RunOptions())
    rec = json.loads((out / "build.json").read_text())["sampling"]
    assert {n: (e["temperature"], e["top_k"], e["top_p"]) for n, e in rec.items()} == {
        "tiny": (0.5, 50, 1.0), "gen": (0.5, 1, 0.5)}
    assert rec["gen"]["source"]["top_k"] == FROM_MODEL
    assert rec["tiny"]["source"]["top_p"] == FROM_DEFAULT

    # The requests of a shard carry the recorded values into vLLM's SamplingParams.
    gen_cfg = run.cfg.models[1]
    shard = next(s for s in run.plan.shards if s.model == "gen")
    ctx = ModelContext(gen_cfg, str(folder), {}, {}, {p.prompt_id: [1, 2, 3]
                                                     for p in run.plan.prompts},
                       run.plan.sampling["gen"])
    sp = sampling_params(shard_requests(run.cfg, ctx, shard)[0])
    assert (sp.temperature, sp.top_k, sp.top_p) == (0.5, 1, 0.5)

    # Resuming with the same file is fine; a changed file changes the rollouts: refused,
    # saying which model and value changed and where each came from.
    prepare_run(parse_config(raw, base_dir=str(tmp_path)), RunOptions())
    _set_generation_config(folder, top_k=3)
    with pytest.raises(BuildRefused, match=r"refusing.*sampling of gen: top_k 1 "
                       r"\(generation_config.json\) there, 3 \(generation_config.json\) now"):
        prepare_run(parse_config(raw, base_dir=str(tmp_path)), RunOptions())
    # An explicit config value changes them too, and is named as the config's.
    raw2 = _two_models(out, folder, sampling={"temperature": 0.5, "max_tokens": 16,
                                              "top_p": 0.9})
    with pytest.raises(BuildRefused, match=r"sampling of tiny: top_p 1.0 \(transformers "
                       r"default\) there, 0.9 \(config\) now"):
        prepare_run(parse_config(raw2, base_dir=str(tmp_path)), RunOptions())
    a, b = make_plan(parse_config(raw, base_dir=str(tmp_path))), make_plan(
        parse_config(raw2, base_dir=str(tmp_path)))
    assert a.plan_hash != b.plan_hash and [i.id for i in a.items()] == [i.id for i in b.items()]


def _hub_cache(root: Path, repo: str, files: dict[str, dict]) -> None:
    """A Hugging Face hub cache entry in its real layout (refs/main -> snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_text(json.dumps(data))


def test_hub_models_resolve_offline_from_the_cache_and_uncached_fails_only_the_run(tmp_path):
    cache = tmp_path / "hf"
    _hub_cache(cache, "asteer-test/cached-model",
               {"generation_config.json": {"top_k": 20, "top_p": 0.95, "temperature": 0.6}})
    cfg = tiny_config(tmp_path / "run")
    cfg["models"] = [{"name": "cached", "path": "asteer-test/cached-model"},
                     {"name": "uncached", "path": "asteer-test/uncached-model"}]
    # a real model needs real contrast banks (never the tiny world's templates)
    cfg["vectors"] = {**cfg.get("vectors", {}), "banks": {"path": "banks"}}
    path = write_config(tmp_path / "hub.yaml", cfg)
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)}
    r = cli("plan", str(path), timeout=120, **offline)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout)["sampling"]
    assert (s["cached"]["top_k"], s["cached"]["top_p"]) == (20, 0.95)
    assert s["cached"]["source"]["top_k"] == FROM_MODEL
    assert s["cached"]["generation_config"] == "hub:asteer-test/cached-model@main"
    assert s["uncached"]["top_k"] is None and "not in the local Hugging Face cache" in \
        s["uncached"]["error"]
    assert "sampling uncached: temperature 0.0 (config), top_k from the model, unresolved" \
        in r.stderr
    # `run` refuses before any engine starts, naming the model and the way out.
    r = cli("run", "--config", str(path), "--no-progress", timeout=120, **offline)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "sampling: model 'uncached': cannot read generation_config.json of " \
           "'asteer-test/uncached-model'" in r.stderr
    assert "set sampling.top_k and sampling.top_p" in r.stderr
    # the error blames the uncached model alone; the depth check only says, for each
    # model, that this cache (generation_config.json only) cannot tell it the depth
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("layer: not checked")]
    assert len(notes) == 2 and all("config.json of 'asteer-test/" in n for n in notes), notes
    errors = "\n".join(ln for ln in r.stderr.splitlines() if ln not in notes)
    assert "cached'" not in errors.replace("'uncached'", "")
    assert not (tmp_path / "run" / "build.json").exists()


def test_plan_summary_shows_each_models_values_and_sources(tmp_path):
    from asteer_build.pipeline.config import load_config

    s = plan_summary(parse_config(tiny_config(tmp_path)))["sampling"]["tiny"]
    assert (s["temperature"], s["top_k"], s["top_p"]) == (0.0, 50, 1.0)
    assert s["source"]["top_k"] == FROM_DEFAULT
    # the demo keeps the untruncated sampling it was tuned with, explicitly
    s = plan_summary(load_config("configs/demo.yaml"))["sampling"]["tiny"]
    assert (s["temperature"], s["top_k"], s["top_p"]) == (1.0, 0, 1.0)
    assert s["source"] == {"temperature": FROM_CONFIG, "top_k": FROM_CONFIG,
                           "top_p": FROM_CONFIG}


@pytest.mark.slow  # starts an engine on the model with the generation_config
def test_the_engine_samples_with_the_resolved_values_only(engines, gen_model):
    """top_k 1 from the model's file makes sampling at temperature 1 deterministic across
    seeds; with the config turning top-k/top-p off, vLLM must not apply the file's top_k
    on its own: the same seeds then give different texts."""
    import torch

    from asteer_build.pipeline.config import ModelConfig, Sampling
    from asteer_build.pipeline.rollouts import RolloutRequest, run_rollouts

    model = ModelConfig("gen", str(gen_model))
    from_file = resolve_sampling(Sampling(temperature=1.0), model)
    off = resolve_sampling(Sampling(temperature=1.0, top_k=0, top_p=1.0), model)
    assert (from_file.top_k, from_file.top_p, off.top_k, off.top_p) == (1, 0.5, 0, 1.0)
    ids = chat_ids(str(gen_model), ["write a short story about a city"])[0]
    # in the test process (conftest.EngineRegistry): vLLM reads the folder's
    # generation_config.json there as in its own process
    engine = engines.get(str(gen_model), inprocess=True, steer_layers=[2])
    engine.register_vectors({"zero": torch.zeros(128)})

    def texts(eff) -> list[str]:
        reqs = [RolloutRequest(id=f"r{s}", prompt_token_ids=ids, vector="zero", alpha=0.0,
                               layer=2, seed=s, max_tokens=12, temperature=eff.temperature,
                               top_k=eff.top_k, top_p=eff.top_p) for s in range(4)]
        return [r.response for r in run_rollouts(engine, reqs)]

    fixed, varied = texts(from_file), texts(off)
    assert len(set(fixed)) == 1 and fixed[0], fixed
    assert len(set(varied)) > 1, varied
