"""The paper config reads the authors' files from the Hub the Hugging Face way: offline,
from a pre-populated cache in their exact layout, it plans the reference testbed with
their 50 prompts (in their order), their levels and their unseen concepts.

The expected prompts and unseen concepts are written here as the authors' code draws
them (`random.seed(42); random.sample(alpaca_eval, 50)`; the stratified concept draw),
independently of asteer's code, so the test cannot agree with a bug in it.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from asteer_build.core import contract
from asteer_build.inputs.sources import SourceError, SourceUnavailable, load_concepts, load_prompts

from .authors_data import REPO, concept_name, instruction, write_authors_cache
from .pipeline_support import ROOT, cli

PAPER = str(ROOT / "configs" / "asteer-paper.yaml")
LEVEL_RANGES = {"low": [(0, 39), (120, 129)], "mid": [(40, 79), (130, 139)],
                "high": [(80, 119), (140, 149)]}
LEVELS_FIELD = {k: [list(r) for r in v] for k, v in LEVEL_RANGES.items()}


def _authors_unseen(seed: int = 42) -> list[int]:
    """The authors' stratified draw, as their code does it: one default_rng(seed); per level
    low, mid, high over its ids ascending: permutation(50), the last 10 unseen."""
    rng = np.random.default_rng(seed)
    unseen = []
    for lvl in ("low", "mid", "high"):
        pool = [i for a, b in LEVEL_RANGES[lvl] for i in range(a, b + 1)]
        shuffled = [pool[i] for i in rng.permutation(len(pool))]
        unseen += shuffled[40:]
    return sorted(unseen)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    commit = write_authors_cache(cache)
    return cache, commit


@pytest.fixture
def offline(monkeypatch, hub_cache):
    """In-process loads: huggingface_hub reads its cache folder and offline switch from
    `constants` at call time."""
    from huggingface_hub import constants

    cache, commit = hub_cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, commit


def test_authors_cache_layout(hub_cache):
    cache, commit = hub_cache
    root = cache / "datasets--Fcr09--SteerBoost-data"
    assert (root / "refs" / "main").read_text() == commit and len(commit) == 40
    snap = root / "snapshots" / commit
    concepts = json.loads((snap / "concepts.json").read_text())
    assert [c["concept_id"] for c in concepts] == list(range(150))
    assert set(concepts[0]) == {"concept_id", "concept_name"}
    rows = json.loads((snap / "alpaca_eval.json").read_text())
    assert len(rows) == 805 and set(rows[0]) == {"instruction", "dataset", "output", "generator"}
    banks = sorted(int(p.stem) for p in (snap / "training").glob("*.json"))
    assert banks == list(range(150))
    bank = json.loads((snap / "training" / "149.json").read_text())
    assert len(bank["positive"]) == len(bank["negative"]) == 50


@pytest.mark.slow  # plans the 1.4M-rollout paper config twice in subprocesses
def test_paper_plan_offline_from_the_authors_files(hub_cache):
    cache, commit = hub_cache
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    r = cli("plan", PAPER, timeout=120, **env)
    assert r.returncode == 0, r.stderr
    assert "asteer-paper: 1,417,500 rollouts" in r.stderr
    assert f"concepts: 150 from hub:{REPO}/concepts.json at {commit[:12]}" in r.stderr
    summ = json.loads(r.stdout)
    assert summ["items"] == 1_417_500 and summ["counts_exact"] is True
    assert "prompts" not in summ and "concepts" not in summ  # the lists need --json
    assert summ["sources"]["prompts"]["origin"] == {
        "hub": REPO, "file": "alpaca_eval.json", "revision": "main", "commit": commit,
        "rows": 805, "sample": 50, "seed": 42}

    r = cli("plan", PAPER, "--json", timeout=120, **env)
    assert r.returncode == 0, r.stderr
    summ = json.loads(r.stdout)
    assert summ["items"] == 1_417_500
    # Prompts: the authors' `random.seed(42); random.sample(rows, 50)`, in that order.
    drawn = random.Random(42).sample(range(805), 50)
    prompts = summ["prompts"]
    assert [p["source_index"] for p in prompts] == drawn
    assert [p["prompt_id"] for p in prompts] == [str(i) for i in range(50)]
    assert [p["prompt"] for p in prompts] == [instruction(i) for i in drawn]
    # Concepts: 150, levels from the id ranges, 10 unseen per level as the authors draw.
    concepts = summ["concepts"]
    assert [c["concept_id"] for c in concepts] == [str(i) for i in range(150)]
    assert concepts[7]["concept"] == concept_name(7)
    level_of = {i: lvl for lvl, rs in LEVEL_RANGES.items() for a, b in rs
                for i in range(a, b + 1)}
    assert all(c["level"] == level_of[int(c["concept_id"])] for c in concepts)
    counts = {lvl: sum(c["level"] == lvl for c in concepts) for lvl in LEVEL_RANGES}
    assert counts == {"low": 50, "mid": 50, "high": 50}
    unseen = [int(c["concept_id"]) for c in concepts if c["partition"] == "unseen"]
    assert unseen == _authors_unseen()
    assert {lvl: sum(level_of[i] == lvl for i in unseen) for lvl in LEVEL_RANGES} == {
        "low": 10, "mid": 10, "high": 10}
    assert {c["partition"] for c in concepts} == {"seen", "unseen"}


def test_paper_plan_offline_without_a_cache_counts_what_it_expects(tmp_path):
    r = cli("plan", PAPER, "--json", timeout=120, HF_HUB_OFFLINE="1",
            HF_HUB_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    summ = json.loads(r.stdout)
    assert summ["items"] == 1_417_500 and summ["counts_exact"] is False
    assert summ["prompts"] is None and summ["concepts"] is None
    assert "concepts: 150 expected, not loaded" in r.stderr
    assert "prompts: 50 expected, not loaded" in r.stderr
    assert "HF_HUB_OFFLINE is set" in r.stderr


def _spec(key: str, **over):
    spec = {"hub": REPO}
    if key == "concepts":
        spec.update(file="concepts.json", columns={"concept": "concept_name"},
                    levels=LEVELS_FIELD)
    else:
        spec.update(file="alpaca_eval.json", columns={"prompt": "instruction"}, sample=50,
                    seed=42)
    spec.update(over)
    return spec


def test_revision_pin_and_recorded_commit(offline):
    _, commit = offline
    cs = load_concepts(_spec("concepts", revision=commit))
    assert len(cs) == 150 and cs.origin["commit"] == commit
    assert cs.origin["revision"] == commit
    with pytest.raises(SourceUnavailable, match=r"hub:Fcr09/SteerBoost-data/concepts.json"
                       r"@0{40} is not in the Hugging Face cache"):
        load_concepts(_spec("concepts", revision="0" * 40))


def test_prompt_ids_are_sample_positions_and_keep_their_row(offline):
    ps = load_prompts(_spec("prompts", sample=5, seed=7))
    assert [p.source_index for p in ps] == random.Random(7).sample(range(805), 5)
    assert [p.prompt_id for p in ps] == ["0", "1", "2", "3", "4"]
    assert ps[0].source == f"hub:{REPO}/alpaca_eval.json"
    inline = load_prompts([{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": "y"}])
    assert [(p.prompt_id, p.source_index) for p in inline] == [("a", 0), ("b", 1)]


def test_a_concept_id_outside_every_level_range_is_named(tmp_path, monkeypatch):
    from huggingface_hub import constants

    write_authors_cache(tmp_path, concept_ids=[*range(150), 150])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match=r"row 150: concept_id 150 is outside every range "
                       r"of concepts.levels \(low 0-39; low 120-129; mid 40-79"):
        load_concepts(_spec("concepts"))


@pytest.mark.parametrize("levels, msg", [
    ({"low": [[0, 99]], "mid": [[90, 149]]},
     "row 90: concept_id 90 is in the ranges of several levels of concepts.levels: low, mid"),
    ({"low": [[0, 149]], "top": [[0, 1]]}, "concepts.levels.top: unknown level"),
    ({"low": [[9, 0]]}, r"concepts.levels.low\[0\]: expected \[first, last\]"),
])
def test_bad_level_ranges_are_named(offline, levels, msg):
    with pytest.raises(SourceError, match=msg):
        load_concepts(_spec("concepts", levels=levels))


def test_levels_need_integer_ids(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps([{"concept_id": "emoji", "concept": "emoji"}]))
    with pytest.raises(SourceError, match="concept_id 'emoji' is not an integer"):
        load_concepts({"path": str(p), "levels": {"low": [[0, 1]]}})


def test_a_sample_above_the_sources_rows_fails_naming_both_numbers(tmp_path):
    cache = tmp_path / "hub"
    write_authors_cache(cache, n_concepts=3, n_prompts=40, bank_size=2)
    cfg = (ROOT / "configs" / "asteer-paper.yaml").read_text()
    r = cli("plan", PAPER, timeout=120, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert r.returncode == 2, r.stderr
    assert ("prompts.sample: 50 rows asked, but hub:Fcr09/SteerBoost-data/alpaca_eval.json "
            "has only 40 rows") in r.stderr
    assert cfg == (ROOT / "configs" / "asteer-paper.yaml").read_text()


def test_sample_is_pythons_random_sample():
    from asteer_build.inputs.sources import _sample

    rows = [{"i": i} for i in range(805)]
    random.seed(42)
    theirs = random.sample(rows, 50)
    assert _sample(rows, 50, 42, "x", "prompts") == theirs
    with pytest.raises(SourceError, match="prompts.sample: must be >= 1"):
        _sample(rows, 0, 42, "x", "prompts")


def test_build_json_records_the_resolved_commit(offline, tmp_path):
    from asteer_build.pipeline.build import RunOptions, prepare_run
    from asteer_build.pipeline.config import parse_config

    from .pipeline_support import tiny_config

    _, commit = offline
    cfg = tiny_config(tmp_path / "run", concepts=_spec("concepts", limit=2),
                      prompts=_spec("prompts", sample=2))
    run = prepare_run(parse_config(cfg, base_dir=str(tmp_path)), RunOptions())
    m = json.loads((tmp_path / "run" / "build.json").read_text())
    assert m["sources"]["concepts"]["commit"] == commit
    assert m["sources"]["prompts"] == {"hub": REPO, "file": "alpaca_eval.json",
                                       "revision": "main", "commit": commit, "rows": 805,
                                       "sample": 2, "seed": 42}
    assert [c.concept_id for c in run.plan.concepts] == ["0", "1"]


def test_contract_draw_is_the_authors_on_their_ids():
    levels = {str(i): lvl for lvl, rs in LEVEL_RANGES.items() for a, b in rs
              for i in range(a, b + 1)}
    assert contract.partition_concepts(levels) == [str(i) for i in _authors_unseen()]
    assert contract.partition_concepts(levels, seed=7) == [str(i) for i in _authors_unseen(7)]
    # legacy contiguous: the authors' static ranges, 0-119 seen and 120-149 unseen
    assert contract.partition_concepts(levels, scheme="contiguous") == [
        str(i) for i in range(120, 150)]
