"""One prompt renderer (`asteer_build.core.prompts`), its config and its read-back; the
steering layer checked against the model's depth before any engine; an engine start
failure that names its cause on the terminal.

Engine tests start one engine each (the tiny Qwen3's probe, a failing start through the
CLI); the rest is light."""

from __future__ import annotations

import json

import pytest

from .pipeline_support import cli, tiny_config, write_config

THINK_OFF_TAIL = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def qwen3() -> str:
    from asteer_build.inputs.tinyworld import build_arch_model

    return str(build_arch_model("qwen3"))


def test_the_renderer_is_the_raw_template_with_the_configured_options(qwen3):
    from transformers import AutoTokenizer

    from asteer_build.core.prompts import PromptFormat, prompt_ids
    from asteer_build.inputs.tinyworld import build_tiny_model

    tok = AutoTokenizer.from_pretrained(qwen3)
    turn = [{"role": "user", "content": "hi"}]

    def raw(t, **kw):
        return list(t.apply_chat_template(turn, add_generation_prompt=True, tokenize=True,
                                          return_dict=False, **kw))

    default = prompt_ids(qwen3, "hi")
    assert default == raw(tok, enable_thinking=False)
    assert tok.decode(default).endswith(THINK_OFF_TAIL)
    on = prompt_ids(qwen3, "hi", PromptFormat.parse({"chat_template_kwargs": {}}))
    assert on == raw(tok) != default
    assert tok.decode(on).endswith("<|im_start|>assistant\n")
    # The demo's template has no switch: the default renders its prompts as before.
    llama = str(build_tiny_model())
    assert prompt_ids(llama, "hi") == raw(AutoTokenizer.from_pretrained(llama))


BAD_FORMATS = [
    ("x", "prompt_format: expected a mapping (got 'x')"),
    ({"template_kwargs": {}}, "prompt_format.template_kwargs: unknown field (known: "
                              "chat_template_kwargs)"),
    ({"chat_template_kwargs": ["enable_thinking"]},
     "prompt_format.chat_template_kwargs: expected a mapping of template variables "
     "(got ['enable_thinking'])"),
    ({"chat_template_kwargs": {"tokenize": False}},
     "prompt_format.chat_template_kwargs.tokenize: set by the renderer, not a template "
     "variable (got False)"),
    ({"chat_template_kwargs": {"enable-thinking": False}},
     "prompt_format.chat_template_kwargs: template variable names are identifiers "
     "(got 'enable-thinking')"),
]


@pytest.mark.parametrize("value,message", BAD_FORMATS)
def test_a_bad_prompt_format_is_refused_naming_the_field(value, message):
    from asteer_build.pipeline.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config({**tiny_config(None), "prompt_format": value})
    assert str(e.value) == message


def test_the_default_format_keeps_hashes_and_another_changes_the_plan():
    from asteer_build.pipeline.config import parse_config
    from asteer_build.pipeline.plan import make_plan

    plain = parse_config(tiny_config(None))
    default = parse_config({**tiny_config(None), "prompt_format": {
        "chat_template_kwargs": {"enable_thinking": False}}})
    thinking = parse_config({**tiny_config(None), "prompt_format": {
        "chat_template_kwargs": {"enable_thinking": True}}})
    assert "prompt_format" not in plain.as_dict()
    assert plain.config_hash() == default.config_hash() != thinking.config_hash()
    assert thinking.as_dict()["prompt_format"] == {
        "chat_template_kwargs": {"enable_thinking": True}}
    hashes = [make_plan(c).plan_hash for c in (plain, default, thinking)]
    assert hashes[0] == hashes[1] != hashes[2]


def test_train_reads_the_format_back_from_build_json_for_suggest(tmp_path):
    from asteer_build.core.prompts import PromptFormat
    from train.data import DatasetError, load_dataset
    from train.model import Predictor
    from train.run import PREDICTOR_DIR, fit_data
    from train.suggest import dataset_prompt_format
    from train.synthetic import write_dataset

    ds = write_dataset(tmp_path / "ds", n_concepts=6, n_prompts=6)
    # a folder without build.json: the default, the only format builds ever used before
    assert load_dataset(ds).report["prompt_format"] == PromptFormat().as_dict()
    rec = {"chat_template_kwargs": {"enable_thinking": True}}
    (ds / "build.json").write_text(json.dumps({"config": {}, "prompt_format": rec}))
    fit_data(load_dataset(ds), tmp_path / "out", n_trials=1, max_rounds=20,
             early_stopping_rounds=5, num_threads=1)
    assert dataset_prompt_format(Predictor.load(tmp_path / "out" / PREDICTOR_DIR)) == rec

    (ds / "build.json").write_text(json.dumps({"prompt_format": {"chat_template_kwargs": 1}}))
    with pytest.raises(DatasetError) as e:
        load_dataset(ds)
    assert str(e.value) == (f"{ds / 'build.json'}: prompt_format.chat_template_kwargs: "
                            "expected a mapping of template variables (got 1)")


def test_plan_refuses_a_layer_past_the_model_and_says_when_it_cannot_check(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", layer=999))
    r = cli("plan", str(cfg), timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("asteer-build: config error: layer: out of range 0..5 for model "
                          "'tiny' (6 blocks: num_hidden_layers in ")
    assert err.endswith("config.json) (got 999)")
    # `run` refuses the same before any engine (and before making the run folder)
    r = cli("run", "--config", str(cfg), timeout=120)
    assert r.returncode == 2 and "layer: out of range 0..5" in r.stderr
    assert not (tmp_path / "run").exists()

    hub = tiny_config(tmp_path / "run", layer=999, vectors={"banks": {"path": str(tmp_path)}})
    hub["models"][0]["path"] = "asteer-test/not-cached-model"
    cfg = write_config(tmp_path / "hub.yaml", hub)
    r = cli("plan", str(cfg), timeout=120, HF_HUB_OFFLINE="1",
            HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    assert r.returncode == 0, r.stderr
    assert ("layer 999: not checked against tiny's depth (config.json of "
            "'asteer-test/not-cached-model' (revision main) is not in the local Hugging "
            "Face cache); the engine checks it when it starts") in r.stderr
    assert json.loads(r.stdout)["depth"]["tiny"]["num_hidden_layers"] is None


def test_the_suggest_probe_sends_the_build_prompt_ids(qwen3, engines):
    """Bug 1: the ids the probe's requests carry, read back from the engine's outputs,
    are the build's rollout prompt ids for a template with a thinking switch."""
    import numpy as np

    from asteer_build.core.prompts import PromptFormat
    from asteer_build.pipeline.config import parse_config
    from asteer_build.pipeline.probe import probe_feature_rows
    from asteer_build.pipeline.work import chat_prompt_ids, resolve_model_path

    cfg = tiny_config(None)
    cfg["models"][0].update(name="q", path="tinyworld:qwen3")
    cfg = parse_config(cfg)
    path = resolve_model_path(cfg.models[0].path)
    assert path == qwen3
    prompts = [p["prompt"] for p in tiny_config(None)["prompts"]]
    build_ids = [chat_prompt_ids(path, p, cfg.prompt_format) for p in prompts]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert all(tok.decode(ids).endswith(THINK_OFF_TAIL) for ids in build_ids)
    # what suggest --live passes: the format train read from the dataset's build.json
    fmt = PromptFormat.from_build({"prompt_format": cfg.prompt_format.as_dict()})

    # the in-process engine test_engine_archs uses for this model (conftest.EngineRegistry)
    eng = engines.get(path, inprocess=True, max_num_batched_tokens=64, max_num_seqs=32)
    seen: dict[str, list[int]] = {}
    core = eng.llm.llm_engine
    step = core.step

    def recording_step():
        outs = step()
        for o in outs:
            seen.setdefault(o.request_id, list(o.prompt_token_ids))
        return outs

    core.step = recording_step
    try:
        rows = probe_feature_rows(eng, np.full(eng.hidden_size, 0.1, np.float32), prompts,
                                  [0.0, 4.0], layer=1, probe_tokens=6, temperature=0.0,
                                  prompt_format=fmt)
    finally:
        core.step = step
    assert len(rows) == 4 and rows["dn_t0_k0"].notna().all()
    sent = {tuple(ids): 0 for ids in build_ids}
    for rid, ids in seen.items():
        if tuple(ids) in sent:
            sent[tuple(ids)] += 1
        else:  # a replay: the same prompt ids, then the tokens the probe generated
            assert any(ids[:len(b)] == b and len(ids) > len(b) for b in build_ids), (rid, ids)
    assert all(n >= 2 for n in sent.values()), sent  # both alphas of every prompt


@pytest.mark.slow
def test_an_engine_that_fails_to_start_says_why_on_the_terminal(tmp_path):
    """Bug 3: the cause of a failed start is raised in a child process (here the
    worker, loading a model file cut short, as an interrupted copy leaves it); the
    CLI's one-line error carries it instead of vLLM's "See root cause above"."""
    import shutil

    from asteer_build.inputs.tinyworld import build_tiny_model

    model = tmp_path / "model"
    shutil.copytree(build_tiny_model(), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = tiny_config(tmp_path / "run")
    cfg["models"][0]["path"] = str(model)
    path = write_config(tmp_path / "c.yaml", cfg)
    r = cli("run", "--config", str(path), "--stages", "vectors", timeout=300)
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err == ("asteer-build: error: EngineStartError: engine start failed: "
                   "SafetensorError: Error while deserializing header: incomplete metadata, "
                   "file not fully covered "
                   f"(full log: {tmp_path / 'run' / 'logs' / 'build.log'})"), err


def test_a_capture_layer_past_the_model_is_refused():
    from asteer_build.pipeline.config import ConfigError, parse_config
    from asteer_build.pipeline.depth import check_layer

    cfg = parse_config(tiny_config(None, capture={"features": False, "extra_offsets": [-1, 4]}))
    with pytest.raises(ConfigError) as e:
        check_layer(cfg)
    assert str(e.value).startswith("capture.extra_offsets: layer 2 + 4 is out of range 0..5 "
                                   "for model 'tiny' (6 blocks: num_hidden_layers in ")
    assert str(e.value).endswith("config.json) (got [-1, 4])")
    ok = parse_config(tiny_config(None, capture={"features": False, "extra_offsets": [-1, 3]}))
    assert check_layer(ok)["tiny"]["num_hidden_layers"] == 6
