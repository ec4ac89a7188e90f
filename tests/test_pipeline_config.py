"""Config, sources and plan: bad input fails before any work, planning is deterministic."""

from __future__ import annotations

import json
import os

import pytest

from asteer_build.inputs.sources import SourceError, load_concepts
from asteer_build.pipeline.build import BuildRefused, RunOptions, prepare_run
from asteer_build.pipeline.config import ConfigError, load_config, parse_config
from asteer_build.pipeline.plan import make_plan, plan_summary

from .pipeline_support import ROOT, cli, tiny_config, write_config


def _run_bad(tmp_path, cfg: dict, *extra: str):
    path = write_config(tmp_path / "bad.yaml", cfg)
    r = cli("run", "--config", str(path), *extra, timeout=60)
    assert r.returncode == 2, r.stderr
    return r.stderr


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.update(temprature=0.5), "temprature: unknown field"),
    (lambda c: c["sampling"].update(temprature=0.5), "sampling.temprature: unknown field"),
    (lambda c: c.update(alphas={"diffmean": {"start": 1, "stop": 3, "step": -0.5},
                                "probe": [1.0]}), "alphas.diffmean.step"),
    (lambda c: c["models"][0].update(path="/nonexistent/model-dir"), "models[0].path"),
    (lambda c: c["models"][0].pop("path"), "models[0].path"),
    (lambda c: c.update(output="/proc/asteer-cannot-write/here"), "output"),
    (lambda c: c.update(alpha_units="sigma"), "alpha_units"),
])
def test_bad_config_fails_before_any_work_naming_the_field(tmp_path, mutate, field):
    cfg = tiny_config(tmp_path / "out")
    mutate(cfg)
    err = _run_bad(tmp_path, cfg)
    assert field in err
    assert "config error" in err or "output" in err
    # Nothing was started or written: no run folder, no manifest.
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section, msg", [
    ({"bank_size": 0}, r"vectors.bank_size: expected an integer >= 1 \(got 0\)"),
    ({"pool": "transformers"}, "vectors.pool: expected vllm or hf"),
    ({"probe_l2": "lots"}, "vectors.probe_l2: expected a number"),
    ({"bank_szie": 8}, "vectors.bank_szie: unknown field"),
    ([8], "vectors: expected a mapping"),
])
def test_bad_vectors_section_names_the_field(section, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(tiny_config(None, vectors=section))


def test_vectors_section_maps_onto_the_stage_settings():
    from asteer_build.vectors import VectorSettings

    s = parse_config(tiny_config(None, vectors={"bank_size": 16, "probe_lr": "5e-3"}))
    assert s.vectors == VectorSettings(2, ("diffmean", "probe"), bank_size=16)
    assert parse_config(tiny_config(None, vectors=None)).vectors.pool == "vllm"


def test_pca_is_a_method_with_its_own_alpha_grid():
    from asteer_build.pipeline.config import METHODS
    from asteer_build.pipeline.plan import make_plan
    from asteer_build.vectors.settings import METHODS as STAGE_METHODS

    assert METHODS == STAGE_METHODS  # the config's list is the stage's
    cfg = parse_config(tiny_config(None, methods=["diffmean", "pca"],
                                   alphas={"diffmean": [1.0, 3.0], "pca": [2.0, 4.0, 8.0]}))
    assert cfg.vectors.methods == ("diffmean", "pca")
    items = list(make_plan(cfg).items())
    assert sorted({(i.method, i.alpha) for i in items if i.method == "pca"}) == \
        [("pca", 2.0), ("pca", 4.0), ("pca", 8.0)]
    assert len(items) == 2 * 2 * (2 + 3)  # concepts x prompts x alphas of both methods
    with pytest.raises(ConfigError, match=r"methods\[1\].*known: diffmean, probe, pca"):
        parse_config(tiny_config(None, methods=["diffmean", "pcaa"]))


def test_unreachable_output_via_flag_names_the_flag(tmp_path):
    (tmp_path / "file").write_text("x")
    err = _run_bad(tmp_path, tiny_config(None), "--out", str(tmp_path / "file" / "sub"))
    assert "--out: output location is unreachable" in err


def test_unknown_uri_scheme_is_unreachable():
    from asteer_build.pipeline.config import check_output

    with pytest.raises(ConfigError, match="output: output location is unreachable"):
        check_output("nosuchfs://bucket/run")


def test_paper_config_plans_1417500_rollouts(tmp_path):
    # Offline with an empty Hugging Face cache: the counts come from `expect:` (the
    # authors' files, cached: tests/test_paper_sources.py).
    r = cli("plan", str(ROOT / "configs" / "asteer-paper.yaml"), "--tok-s", "2500",
            timeout=60, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    summ = json.loads(r.stdout)
    assert summ["items"] == 1_417_500 and summ["counts_exact"] is False
    assert "1,417,500 rollouts" in r.stderr
    # engine-hours: 472,500 rollouts per model x 1,140 tokens / 2,500 tok/s / 3600 s
    h = summ["engine_hours"]
    assert h["expected_response_tokens"] == 1140 and h["tok_s"] == 2500
    assert h["by_model"]["gemma-2-2b-it"] == {"items": 472_500, "generated_tokens": 538_650_000,
                                              "engine_hours": 59.85}
    assert h["generated_tokens"] == 1_615_950_000 and h["engine_hours"] == 179.55
    assert summ["tokens"]["decode_expected"] == 1_615_950_000
    assert "179.55 in all" in r.stderr and "assumes:" in r.stderr
    by = {(x["model"], x["method"]): x["alphas"] for x in summ["by_model_method"]}
    assert by[("qwen3-1.7b", "diffmean")] == 45 and by[("llama-3.2-3b-instruct", "probe")] == 18
    cfg = load_config(ROOT / "configs" / "asteer-paper.yaml")
    llama = cfg.models[2]
    assert cfg.alphas(llama, "probe")[:3] == (0.25, 0.5, 0.75)
    assert cfg.alphas(cfg.models[0], "diffmean")[-1] == 9.0


def test_demo_config_plans_the_tiny_world():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    summ = plan_summary(cfg, tok_s=100.0)
    assert summ["counts_exact"] and summ["items"] == make_plan(cfg).n_items
    # no expected_response_tokens in the demo config: half of max_tokens (32)
    h = summ["engine_hours"]
    assert h["expected_response_tokens"] == 16
    assert h["by_model"] == {"tiny": {"items": 2304, "generated_tokens": 36_864,
                                      "engine_hours": 0.1}}
    assert h["generated_tokens"] == 36_864 and h["engine_hours"] == 0.1
    with pytest.raises(ValueError, match="--tok-s must be a positive"):
        plan_summary(cfg, tok_s=0.0)
    p = make_plan(cfg)
    assert len(p.concepts) == 12 and len(p.prompts) == 8
    assert {c.concept_level for c in p.concepts} == {"low", "mid", "high"}


@pytest.mark.parametrize("value", ["0", "-5", "fast", "inf"])
def test_plan_tok_s_must_be_positive(value, capsys):
    from asteer_build.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "demo", "--tok-s", value])
    assert f"--tok-s: expected a positive number of tokens/s (got '{value}')" in \
        capsys.readouterr().err


def test_replanning_gives_identical_shards_and_ids(tmp_path):
    cfg = parse_config(tiny_config(tmp_path / "o"), base_dir=str(tmp_path))
    a, b = make_plan(cfg), make_plan(parse_config(tiny_config(tmp_path / "o"),
                                                  base_dir=str(tmp_path)))
    assert a.plan_hash == b.plan_hash
    assert [[i.id for i in s.items] for s in a.shards] == [[i.id for i in s.items]
                                                          for s in b.shards]
    ids = [i.id for i in a.items()]
    assert len(ids) == len(set(ids)) == 24
    assert len(a.shards) == 6 and all(len(s.items) == 4 for s in a.shards)
    assert len({i.seed for i in a.items()}) == 24  # per-item seeds
    # Shards never mix (model, method): one vector bank per shard.
    assert all(len({i.method for i in s.items}) == 1 for s in a.shards)


def test_config_edit_that_changes_items_is_refused(tmp_path):
    out = tmp_path / "run"
    cfg = parse_config(tiny_config(out), base_dir=str(tmp_path))
    prepare_run(cfg, RunOptions())
    # A setting that does not change items is accepted (and recorded).
    ok = tiny_config(out)
    ok["judge"] = {"kind": "rules", "model": "rules-v1"}
    prepare_run(parse_config(ok, base_dir=str(tmp_path)), RunOptions())
    edited = tiny_config(out)
    edited["alphas"]["probe"] = [1.0, 2.0, 6.0]
    with pytest.raises(BuildRefused, match=r"refusing.*changed: (judge, )?models.*--out"):
        prepare_run(parse_config(edited, base_dir=str(tmp_path)), RunOptions())
    # The same edit into a new location is fine.
    prepare_run(parse_config(edited, base_dir=str(tmp_path)),
                RunOptions(out=str(tmp_path / "run2")))


@pytest.mark.parametrize("rows, msg", [
    ([{"concept_id": "a", "concept": "x"}, {"concept_id": "a", "concept": "y"}],
     "duplicate concept_id 'a'"),
    ([{"concept_id": "a", "concept": " "}], "row 0: empty 'concept'"),
    ([{"concept_id": "a"}], "row 0: missing column 'concept'"),
    ([{"concept_id": "a", "concept": "x", "concept_level": "top"}], "concept_level 'top'"),
])
def test_concept_files_with_clear_errors(tmp_path, rows, msg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for ext in ("json", "csv", "parquet"):
        p = tmp_path / f"c.{ext}"
        if ext == "json":
            p.write_text(json.dumps(rows))
        elif ext == "csv":
            cols = sorted({k for r in rows for k in r})
            p.write_text(",".join(cols) + "\n" + "\n".join(
                ",".join(str(r.get(k, "")) for k in cols) for r in rows) + "\n")
            if "missing column" in msg:
                continue  # a CSV has every column in every row
        else:
            pq.write_table(pa.Table.from_pylist(rows), p)
            if "missing column" in msg:
                continue
        with pytest.raises(SourceError, match=msg):
            load_concepts(str(p), str(tmp_path))


def test_concept_file_round_trip(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("concept_id,concept,concept_level\nk1,emoji,low\nk2,formal tone,mid\n")
    cs = load_concepts(os.path.basename(p), str(tmp_path))
    assert [(c.concept_id, c.concept_level) for c in cs] == [("k1", "low"), ("k2", "mid")]


def test_store_commit_on_an_fsspec_filesystem():
    """Non-local outputs go through pyarrow / fsspec: the same commit and manifest."""
    import pyarrow as pa

    from asteer_build.pipeline.config import check_output
    from asteer_build.pipeline.shards import Manifest, committed_files, open_store, read_stage

    uri = check_output("memory://asteer-test/run")
    store = open_store(uri)
    m = Manifest.create(store, config={}, config_hash="c", plan_hash="p", n_items=2,
                        n_shards=1)
    f = store.write_table("rollouts", "shard-000000", pa.table({"id": ["a", "b"]}))
    m.record([f])
    again = Manifest.load(open_store(uri))
    assert again.entries("rollouts")["shard-000000"]["rows"] == 2
    assert read_stage(store, "rollouts").column("id").to_pylist() == ["a", "b"]
    assert committed_files(store, "rollouts") == [store.path("rollouts/shard-000000.parquet")]
    assert store.sha256(f.path) == f.sha256
