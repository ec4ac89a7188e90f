"""One typed config tree: `parse_config` builds the judge, capture and vectors settings
once and the stages take them from `BuildConfig`; the record of the config
(`as_dict`, `config_hash`) stays what the file wrote, so existing run folders resume.
Light: no engine."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from asteer_build.pipeline.config import ConfigError, load_config, parse_config
from asteer_build.pipeline.rollouts import CaptureSettings
from asteer_build.vectors.settings import VectorSettings
from judge.config import JudgeConfig

from .pipeline_support import ROOT, cli, tiny_config, write_config

LLM_JUDGE = {"kind": "llm", "model": "gpt-5-mini",
             "endpoints": [{"base_url": "http://127.0.0.1:9/v1", "max_concurrency": 4}],
             "retry": {"max_attempts": 2}, "prices": {"input_per_mtok": 0.25}}

#: config_hash() as the code gave it before the typed tree (commit d4d1ddb): a run folder
#: records this hash, and a resumed build must find the same one
PINNED = [
    ("demo", lambda: load_config(ROOT / "configs" / "demo.yaml"), "30e80229a5e614c4"),
    ("paper", lambda: load_config(ROOT / "configs" / "asteer-paper.yaml"), "e21cfb61e383ce24"),
    ("pipeline", lambda: parse_config(tiny_config(None)), "d1d226be52041667"),
    ("pipeline+output", lambda: parse_config(tiny_config("runs/x")), "feedf4ddabeceaed"),
    ("capture", lambda: parse_config(tiny_config(
        None, capture={"steps": [0, 1, 3, 5], "activations": False})), "5fc80870755bc937"),
    ("capture {}", lambda: parse_config(tiny_config(None, capture={})), "910d9057302b8f95"),
    ("no judge", lambda: parse_config(
        {k: v for k, v in tiny_config(None).items() if k != "judge"}), "d1d226be52041667"),
    ("vllm judge", lambda: parse_config(tiny_config(None, judge={
        "kind": "vllm", "model": "j", "server": {"model": "m", "replicas": 2}})),
     "db9fa55c225c0fb5"),
    ("llm judge", lambda: parse_config(tiny_config(None, judge=LLM_JUDGE)), "b3ccc5f8246fc466"),
    ("no vectors", lambda: parse_config(tiny_config(None, vectors=None)), "bd8eda48a9c3cf79"),
    ("bank folder", lambda: parse_config(tiny_config(None, vectors={"banks": {"path": "data"}})),
     "6cf27459b5571142"),
]


@pytest.mark.parametrize("name, make, want", PINNED, ids=[p[0] for p in PINNED])
def test_config_hash_is_the_one_recorded_before_the_typed_tree(name, make, want):
    assert make().config_hash() == want


def test_as_dict_records_the_sections_as_written():
    cfg = parse_config(tiny_config(None, capture={"steps": [0, 1, 3, 5]}, judge=LLM_JUDGE))
    d = json.loads(json.dumps(cfg.as_dict(), sort_keys=True, default=str))
    assert d["capture"] == {"steps": [0, 1, 3, 5]}
    assert d["judge"] == LLM_JUDGE
    assert d["vectors"] == {"bank_size": 16}
    assert "written" not in d and "base_dir" not in d
    assert list(cfg.as_dict()) == ["name", "models", "methods", "layer", "concepts", "prompts",
                                   "sampling", "output", "shard_size", "judge", "capture",
                                   "vectors", "ray", "positions"]


def test_the_sections_are_typed_settings_built_once():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert isinstance(cfg.judge, JudgeConfig) and cfg.judge.kind == "rules"
    assert isinstance(cfg.capture, CaptureSettings)
    assert (cfg.capture.steps, cfg.capture.offsets) == ((0, 1, 3, 5), (0, 1, 2, 3, 5, 10, 15))
    assert cfg.capture.activations and cfg.capture.replay == "exact"
    assert cfg.vectors == VectorSettings(2, ("diffmean", "probe"), pool="vllm")
    assert parse_config(tiny_config(None, capture={})).capture is None
    assert parse_config(tiny_config(None)).capture is None
    llm = parse_config(tiny_config(None, judge=LLM_JUDGE)).judge
    assert (llm.model, llm.endpoints[0].max_concurrency, llm.retry.max_attempts,
            llm.prices.input_per_mtok) == ("gpt-5-mini", 4, 2, 0.25)


def test_stages_use_the_built_settings_and_never_parse_them_again(monkeypatch):
    """After parsing, the judge estimate and the vectors stage's settings come from the
    typed tree: with the parsers broken, they still work and give the same objects."""
    from asteer_build.pipeline import sections
    from asteer_build.pipeline.build import vector_settings_for
    from asteer_build.pipeline.plan import judge_estimate

    cfg = parse_config(tiny_config(None, judge=LLM_JUDGE, capture={"steps": [0, 1]}))

    def broken(*a, **k):
        raise AssertionError("parsed again")

    monkeypatch.setattr(JudgeConfig, "from_dict", broken)
    monkeypatch.setattr(VectorSettings, "from_section", broken)
    for name in ("judge_section", "capture_section", "vectors_section"):
        monkeypatch.setattr(sections, name, broken)
    est = judge_estimate(cfg, 10, None, None)
    assert (est["kind"], est["model"], est["calls"]) == ("llm", "gpt-5-mini", 10)
    vs = vector_settings_for(cfg, cfg.models[0])
    assert vs.engine_args == cfg.models[0].engine_args and vs.bank_size == 16


def test_the_config_travels_to_ray_actors_intact():
    cfg = parse_config(tiny_config(None, judge=LLM_JUDGE, capture={"steps": [0, 1]}))
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and back.config_hash() == cfg.config_hash()
    assert back.capture == cfg.capture and back.judge == cfg.judge
    # a replaced config keeps the record of what was written
    assert dataclasses.replace(cfg, output="elsewhere").as_dict()["judge"] == LLM_JUDGE


@pytest.mark.parametrize("over, msg", [
    ({"capture": {"stepz": [0]}}, "capture.stepz: unknown field (known: activation_dtype, "
     "activations, extra_offsets, features, offsets, replay, steps)"),
    ({"capture": {"steps": [3, 1]}}, "capture.steps: need increasing ints in 0..63, got [3, 1]"),
    ({"capture": [1]}, "capture: expected a mapping or null (got [1])"),
    ({"vectors": {"pool": "transformers"}}, "vectors.pool: expected vllm or hf "
     "(got 'transformers')"),
    ({"vectors": [8]}, "vectors: expected a mapping (got [8])"),
    ({"judge": "rules"}, "judge: expected a mapping (got 'rules')"),
    ({"judge": {"kind": "rulez"}}, "judge.kind: unknown kind 'rulez' (known: llm, "
     "openai-batch, rules, vllm)"),
    ({"judge": {"kind": "llm", "model": "m"}}, "judge.endpoints: the llm judge needs at "
     "least one endpoint (or set judge.kind: rules)"),
    ({"judge": {"kind": "vllm", "model": "j"}}, "judge.server.model: `judge.kind: vllm` "
     "needs the judge model's path or Hub id (got none)"),
    ({"judge": {"kind": "rules", "batch": {"max_resubmits": -1}}},
     "judge.batch.max_resubmits: expected an integer >= 0 (got -1)"),
])
def test_errors_still_name_the_field(over, msg):
    with pytest.raises(ConfigError) as e:
        parse_config(tiny_config(None, **over))
    assert str(e.value) == msg


def test_asteer_build_names_a_mistyped_endpoint_field_with_exit_2(tmp_path):
    cfg = tiny_config(tmp_path / "out", judge={"kind": "llm",
                                               "endpoints": [{"url": "http://x/v1"}]})
    r = cli("plan", str(write_config(tmp_path / "c.yaml", cfg)), timeout=120)
    assert r.returncode == 2
    assert ("asteer-build: config error: judge.endpoints[0]: unknown field 'url' (known: "
            "base_url, model, api_key_env, max_concurrency)") in r.stderr
    assert not (tmp_path / "out").exists()
