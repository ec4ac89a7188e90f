"""Contrast banks in the reference authors' layout (`training/{concept_id}.json` =
{"positive": [...], "negative": [...]}) from a local folder and from a pre-populated
Hugging Face cache offline; the probe trained exactly as the authors' code trains it;
the template banks refused for a real model. No engine here (the vLLM pooling of these
banks is in test_vectors.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from asteer_build.inputs.sources import Concept
from asteer_build.inputs.tinyworld import build_tiny_model, is_tiny_model
from asteer_build.pipeline.build import vector_settings_for
from asteer_build.pipeline.config import ConfigError, parse_config
from asteer_build.vectors import (
    BankError,
    ProbeSettings,
    VectorSettings,
    build_vectors,
    stage_banks,
    train_probe,
)
from asteer_build.vectors.bankfiles import BankFiles, load_bank_files

REPO = "Fcr09/SteerBoost-data"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _bank(cid: int, n: int = 3) -> dict[str, list[str]]:
    return {"positive": [f"ocean text {cid} {i}" for i in range(n)],
            "negative": [f"plain text {cid} {i}" for i in range(n)]}


def write_hub_cache(cache: Path, files: dict[str, object], commit: str = COMMIT) -> Path:
    """A Hugging Face hub cache holding dataset `REPO` at `commit` (`main` points there),
    as `hf_hub_download` leaves it: snapshots/<commit>/<file>, refs/main."""
    root = cache / f"datasets--{REPO.replace('/', '--')}"
    for name, obj in files.items():
        p = root / "snapshots" / commit / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Point huggingface_hub at an empty cache under tmp_path, offline (its constants are
    read at import, so they are patched, not the environment)."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


CS = [Concept("0", "ocean"), Concept("1", "music"), Concept("7", "robot")]


def test_hub_banks_offline_from_the_cache(offline_hub):
    write_hub_cache(offline_hub, {f"training/{c.concept_id}.json": _bank(int(c.concept_id))
                                  for c in CS})
    banks = load_bank_files(CS, {"hub": REPO})
    assert list(banks) == ["0", "1", "7"]
    assert banks["7"].positives == _bank(7)["positive"]
    assert banks["7"].negatives == _bank(7)["negative"]
    assert banks["0"].header == {"source": "hub", "repo": REPO, "file": "training/0.json",
                                 "revision": COMMIT}
    # pinned to the commit too, and through the stage
    pinned = load_bank_files(CS, {"hub": REPO, "revision": COMMIT})
    assert all(pinned[k].digest() == banks[k].digest() for k in banks)
    staged = stage_banks(CS, VectorSettings(2, banks={"hub": REPO}),
                         model_path="Qwen/Qwen3-1.7B")
    assert [b.digest() for b in staged.values()] == [b.digest() for b in banks.values()]
    # a concept whose file the dataset lacks: named, with the file
    with pytest.raises(BankError, match=rf"^9: no bank file training/9.json in Hub dataset "
                                        rf"Fcr09/SteerBoost-data@{COMMIT} in the local "
                                        "Hugging Face cache"):
        load_bank_files([*CS, Concept("9", "castle")], {"hub": REPO})


def test_local_folder_banks_and_bad_files(tmp_path):
    root = tmp_path / "data"
    (root / "training").mkdir(parents=True)
    for c in CS:
        (root / "training" / f"{c.concept_id}.json").write_text(
            json.dumps(_bank(int(c.concept_id))))
    banks = load_bank_files(CS, {"path": str(root)})
    assert banks["1"].positives == _bank(1)["positive"]
    assert banks["1"].header == {"source": "path", "file": str(root / "training/1.json")}
    flat = load_bank_files(CS[:1], BankFiles(path=str(root / "training"),
                                             pattern="{concept_id}.json"))
    assert flat["0"].digest() == banks["0"].digest()

    f = root / "training" / "1.json"
    f.write_text(json.dumps({"negative": ["a b c"]}))
    with pytest.raises(BankError, match=rf"^1: bank file {f} has no `positive` key "
                                        r"\(keys: \['negative'\]\)"):
        load_bank_files(CS, {"path": str(root)})
    # the stage refuses it before any engine starts (no engine for this model here)
    with pytest.raises(BankError, match="^1: bank file .* has no `positive` key"):
        build_vectors("Qwen/Qwen3-1.7B", CS, tmp_path / "out",
                      VectorSettings(2, banks={"path": str(root)}))
    assert not (tmp_path / "out").exists()
    f.write_text(json.dumps({"positive": ["a b c"]}))
    with pytest.raises(BankError, match="^1: bank file .* has no `negative` key"):
        load_bank_files(CS, {"path": str(root)})
    f.write_text(json.dumps({"positive": ["a b", "  "], "negative": ["c d"]}))
    with pytest.raises(BankError, match=r"1.json: `positive`\[1\] must be a non-empty "
                                        "string"):
        load_bank_files(CS, {"path": str(root)})
    f.write_text(json.dumps({"positive": ["a b"], "negative": ["c d", 7]}))
    with pytest.raises(BankError, match=r"`negative`\[1\] must be a non-empty string "
                                        r"\(got 7\)"):
        load_bank_files(CS, {"path": str(root)})
    f.write_text(json.dumps({"positive": "a b", "negative": ["c d"]}))
    with pytest.raises(BankError, match="`positive` must be a non-empty list"):
        load_bank_files(CS, {"path": str(root)})
    f.write_text("[1, 2]")
    with pytest.raises(BankError, match="expected an object with `positive` and "):
        load_bank_files(CS, {"path": str(root)})
    f.write_text("{not json")
    with pytest.raises(BankError, match="1: bank file .* is not valid JSON"):
        load_bank_files(CS, {"path": str(root)})
    f.unlink()
    with pytest.raises(BankError, match=rf"^1: no bank file training/1.json in folder "
                                        rf"{root}"):
        load_bank_files(CS, {"path": str(root)})


@pytest.mark.parametrize("section,msg", [
    ({}, "set exactly one of `hub`"),
    ({"hub": REPO, "path": "x"}, "set exactly one of `hub`"),
    ({"hub": "not a repo"}, "vectors.banks.hub: expected a Hub dataset id"),
    ({"path": "x", "revision": "main"}, "vectors.banks.revision: only for `hub` banks"),
    ({"hub": REPO, "pattern": "training/all.json"}, "vectors.banks.pattern: expected a "
                                                    "file name containing"),
    ({"hub": REPO, "pattern": "{level}/{concept_id}.json"}, "only '{concept_id}' may"),
    ({"hub": REPO, "split": "train"}, "vectors.banks.split: unknown field"),
    ("Fcr09/SteerBoost-data", "vectors.banks: expected a mapping"),
])
def test_bank_section_errors(section, msg):
    with pytest.raises(ValueError, match=msg):
        VectorSettings(2, banks=section)


def test_template_banks_are_for_the_tiny_world_only(tmp_path):
    tiny = str(build_tiny_model())
    assert is_tiny_model(tiny) and is_tiny_model("tinyworld")
    assert not is_tiny_model("Qwen/Qwen3-1.7B") and not is_tiny_model(tmp_path)
    # the stage: a real model with no banks configured is refused before any engine
    with pytest.raises(BankError, match="no contrast banks configured for model "
                                        "Qwen/Qwen3-1.7B: .* set vectors.banks"):
        stage_banks(CS, VectorSettings(2), model_path="Qwen/Qwen3-1.7B")
    assert len(stage_banks(CS, VectorSettings(2, bank_size=3), model_path=tiny)["0"]
               .positives) == 3
    with pytest.raises(ValueError, match="vectors.banks and vectors.bank_dir are both set"):
        VectorSettings(2, banks={"hub": REPO}, bank_dir=str(tmp_path))
    # the config: told as soon as it loads
    base = {"models": [{"name": "tiny", "path": "tinyworld"},
                       {"name": "qwen", "path": "Qwen/Qwen3-1.7B"}],
            "methods": ["diffmean"], "layer": 2, "alphas": {"diffmean": [1, 2]}}
    with pytest.raises(ConfigError, match=r"vectors.banks: required for model\(s\) "
                                          r"\['qwen'\]: the built-in template banks are "
                                          "for the tiny world only"):
        parse_config(base)
    ok = parse_config({**base, "vectors": {"banks": {"hub": REPO, "revision": COMMIT}}})
    assert ok.vectors.banks == BankFiles(hub=REPO, revision=COMMIT)
    assert parse_config({**base, "models": base["models"][:1]}).vectors.banks is None
    # the build pools on each model's own engine arguments unless vectors.engine_args is set
    gpu = {"dtype": "bfloat16", "max_model_len": 4096}
    paper = parse_config({**base, "models": [{"name": "qwen", "path": "Qwen/Qwen3-1.7B",
                                              "engine_args": gpu, "tensor_parallel_size": 2}],
                          "vectors": {"banks": {"hub": REPO}}})
    assert vector_settings_for(paper, paper.models[0]).engine_args == {
        **gpu, "tensor_parallel_size": 2}
    own = parse_config({**base, "models": [
        {"name": "qwen", "path": "Qwen/Qwen3-1.7B", "engine_args": gpu}],
        "vectors": {"banks": {"hub": REPO}, "engine_args": {"dtype": "float32"}}})
    assert vector_settings_for(own, own.models[0]).engine_args == {"dtype": "float32"}
    assert parse_config({**base, "models": [{"name": "t", "path": tiny}]}).models[0].path == tiny
    # a bank folder is relative to the config file
    rel = parse_config({**base, "vectors": {"banks": {"path": "data"}}}, base_dir=str(tmp_path))
    assert rel.vectors.banks.path == str(tmp_path / "data")


def _authors_probe(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """The reference authors' LinearProbe training (their `steering.py`, written out here
    from its description: nn.Linear without bias, AdamW lr 5e-3 wd 1e-3, 10 epochs, mean
    BCE-with-logits + 0.01 * ||w||_2), after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], 1, bias=False)
    opt = torch.optim.AdamW(probe.parameters(), lr=0.005, weight_decay=0.001)
    crit = torch.nn.BCEWithLogitsLoss()
    for _ in range(10):
        opt.zero_grad()
        loss = crit(probe(x).squeeze(-1), y) + 0.01 * probe.weight.norm(2)
        loss.backward()
        opt.step()
    return probe.weight.detach()[0]


def test_probe_is_trained_as_the_authors_train_it():
    rng = np.random.default_rng(3)
    d = 96
    direction = rng.normal(size=d).astype(np.float32)
    pos = (rng.normal(size=(20, d)) + 0.3 * direction).astype(np.float32)
    neg = (rng.normal(size=(20, d)) - 0.3 * direction).astype(np.float32)
    x = torch.from_numpy(np.concatenate([pos, neg]))
    y = torch.tensor([1.0] * 20 + [0.0] * 20)
    for seed in (0, 5):
        ours, acc = train_probe(pos, neg, ProbeSettings(seed=seed))
        theirs = _authors_probe(x, y, seed)
        assert ours.dtype == torch.float32 and ours.shape == (d,)
        assert torch.equal(ours, theirs), seed  # same init, same steps, same bits
        assert acc == int(((x @ ours > 0).float() == y).sum()) / 40 and acc > 0.9
    # the penalty is the norm: a squared-norm penalty lands elsewhere
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.nn.Linear(d, 1, bias=False).weight.detach().clone())
    opt = torch.optim.AdamW([w], lr=0.005, weight_decay=0.001)
    for _ in range(10):
        opt.zero_grad()
        (torch.nn.functional.binary_cross_entropy_with_logits((x @ w.T).squeeze(-1), y)
         + 0.01 * (w * w).sum()).backward()
        opt.step()
    ours0, _ = train_probe(pos, neg, ProbeSettings(seed=0))
    assert not torch.allclose(w.detach()[0], ours0, rtol=0, atol=1e-6)
    # the init is nn.Linear's: uniform within 1/sqrt(d); zero epochs return it untouched
    init, _ = train_probe(pos, neg, ProbeSettings(epochs=0, seed=0))
    torch.manual_seed(0)
    assert torch.equal(init, torch.nn.Linear(d, 1, bias=False).weight.detach()[0])
    assert float(init.abs().max()) <= 1 / math.sqrt(d)
