"""`asteer-build import`: the reference authors' result files and judgment caches, in their
exact layout (tests/authors_data.py follows their `utils.save_results`,
`process_judgment_results.py`, `utils.build_judgment_cache_payload` and
`tools/upload_data.py`), become our dataset folder, which `datasets.load_dataset` loads
with labels, levels and partition. No vLLM, no network: a Hub id is read from a
pre-populated offline Hugging Face cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest

from asteer_build.cli import main
from asteer_build.core import contract
from asteer_build.pipeline.plan import item_id
from tests.authors_data import (
    FAILED_EXPLANATION,
    REPO,
    alpaca_rows,
    concept_name,
    judgment,
    pack_results,
    prompt_draw,
    repo_folder,
    write_authors_cache,
    write_judgments,
    write_results,
)

needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd command")

# pair A: an unpacked result/ tree with a judgment cache; pair B: a tarball, no cache
A = ("diffmean", "gemma-2-2b-it", [0, 45, 125, 140], [0.0, 0.2, 1.4, 3.0])
B = ("probe_l2-0.01", "Qwen3-1.7B", [3, 88], [10.0, 20.0])
FAILED, UNJUDGED, DISAGREE = 7, 9, (0, 1, 1)  # (cid, alpha index, sid) changed in the cache
LEVEL = {0: "low", 3: "low", 45: "mid", 88: "high", 125: "low", 140: "high"}


def _top_files(d: Path) -> None:
    """concepts.json (all 150), alpaca_eval.json (805 rows) and a card stating a license."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "concepts.json").write_text(json.dumps(
        [{"concept_id": c, "concept_name": concept_name(c)} for c in range(150)]))
    (d / "alpaca_eval.json").write_text(json.dumps(alpaca_rows()))
    (d / "README.md").write_text("---\nlicense: mit\npretty_name: SteerBoost Data\n---\n\n# x\n")


def _pair_a(d: Path) -> None:
    m, model, cids, alphas = A
    write_results(d, m, model, cids, alphas, failed_sids=(FAILED,), unjudged_sids=(UNJUDGED,))
    p = write_judgments(d, m, model, cids, alphas)
    blob = json.loads(p.read_text())
    cid, k, sid = DISAGREE
    a = str(round(alphas[k], 2))
    blob["judgments"][str(cid)][a][str(sid)] = (judgment(cid, k, sid) + 1) % 3
    for by_alpha in blob["judgments"].values():  # their cache holds the failures' 0 too
        for by_sid in by_alpha.values():
            by_sid[str(FAILED)] = 0
    p.write_text(json.dumps(blob))


@pytest.fixture(scope="module")
def authors_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("authors") / "data"
    _top_files(d)
    _pair_a(d)
    m, model, cids, alphas = B
    write_results(d, m, model, cids, alphas, unjudged_sids=(UNJUDGED,))
    if shutil.which("zstd"):
        pack_results(d, m, model, d)
        shutil.rmtree(d / "result" / m)
    return d


def _expected(pair: tuple, cid: int, k: int, sid: int, from_cache: bool) -> dict:
    m, model, _, alphas = pair
    method = "diffmean" if m == "diffmean" else "probe"
    alpha = alphas[k]
    j = judgment(cid, k, sid)
    out = {
        "id": item_id(model, method, str(cid), str(sid), 10, alpha, 0),
        "model": model, "method": method, "concept_id": str(cid),
        "concept": concept_name(cid), "concept_level": LEVEL[cid], "prompt_id": str(sid),
        "prompt": prompt_draw()[sid]["instruction"], "layer": 10, "alpha": alpha,
        "vector_norm": (10.0 + cid / 8) if m == "diffmean" else None, "alpha_raw": alpha,
        "seed": None,
        "response": f"Steered reply {cid}/{alpha}/{sid} about {concept_name(cid)}.",
        "response_tokens": None, "finish_reason": None, "label": j,
        "judge_model": "gpt-5-mini", "judge_status": "ok",
        "judge_explanation": f"Synthetic judge reason for sample {sid}.", "judge_error": None,
        "judge_rubric": "steerboost-authors", "authors_label": j,
    }
    if pair is A and sid == FAILED:
        out.update(label=None, judge_status="failed", judge_explanation=None,
                   judge_error=FAILED_EXPLANATION, authors_label=0)
    elif sid == UNJUDGED and from_cache:
        out.update(judge_explanation=None)
    elif sid == UNJUDGED:
        out.update(label=None, judge_model=None, judge_status="pending",
                   judge_explanation=None, judge_rubric=None, authors_label=None)
    return out


def _check_rows(rows: list[dict], pairs: list[tuple]) -> None:
    got = {r["id"]: r for r in rows}
    want = {}
    for pair in pairs:
        _, _, cids, alphas = pair
        for cid in cids:
            for k, alpha in enumerate(alphas):
                if alpha == 0.0:
                    continue  # their unsteered baseline: skipped, as their loaders do
                for sid in range(50):
                    e = _expected(pair, cid, k, sid, from_cache=pair is A)
                    want[e["id"]] = e
    assert len(rows) == len(got) == len(want)
    for rid, e in want.items():
        r = got[rid]
        for k, v in e.items():
            if isinstance(v, float):
                assert r[k] == pytest.approx(v), (rid, k)
            else:
                assert r[k] == v, (rid, k, r[k], v)


@needs_zstd
def test_import_folder_loads_with_labels_levels_and_partition(authors_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["import", str(authors_dir), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    n_a, n_b = 4 * 3 * 50, 2 * 2 * 50
    assert summary["counts"] == {"rollouts": n_a + n_b, "concepts": 150, "prompts": 50}
    stats = {p["model"]: p for p in summary["pairs"]}
    a, b = stats["gemma-2-2b-it"], stats["Qwen3-1.7B"]
    assert (a["files"], a["skipped_alpha0"], a["from_cache"], a["cache_disagreements"],
            a["cache_unmatched"], a["failed"], a["pending"]) == (12, 4, 12, 1, 0, 12, 0)
    assert (b["files"], b["from_cache"], b["failed"], b["pending"]) == (4, 0, 0, 4)
    assert b["from"].endswith("result__probe_l2-0.01__Qwen3-1.7B.tar.zst")

    rollouts = datasets.load_dataset(str(out), "rollouts", split="train")
    assert rollouts.features["label"].dtype == "int8"
    _check_rows(rollouts.to_list(), [A, B])

    concepts = datasets.load_dataset(str(out), "concepts", split="train").to_list()
    assert [c["concept_id"] for c in concepts] == [str(i) for i in range(150)]
    for c in concepts:
        i = int(c["concept_id"])
        assert c["concept"] == concept_name(i)
        assert c["concept_level"] == ("low" if i < 40 or 120 <= i < 130 else
                                      "mid" if i < 80 or 130 <= i < 140 else "high")
    levels = {c["concept_id"]: c["concept_level"] for c in concepts}
    unseen = set(contract.partition_concepts(levels))
    assert len(unseen) == 30
    for c in concepts:
        assert c["partition"] == ("ood" if c["concept_id"] in unseen else "id")
    for lvl in ("low", "mid", "high"):
        assert sum(1 for c in concepts if c["concept_level"] == lvl
                   and c["partition"] == "ood") == 10

    prompts = datasets.load_dataset(str(out), "prompts", split="train").to_list()
    draw = prompt_draw()
    assert [(p["prompt_id"], p["prompt"], p["source"]) for p in prompts] == [
        (str(i), r["instruction"], f"alpaca_eval/{r['dataset']}") for i, r in enumerate(draw)]

    card = (out / "README.md").read_text()
    assert "license: mit" in card and "**mit**" in card
    assert "When is Your LLM Steerable?" in card and "No `features`" in card
    assert "authors_label" in card and "Evaluation error parsing response" in card
    build = json.loads((out / "build.json").read_text())
    assert build["format"] == "asteer-import/1" and build["source"]["license"] == "mit"
    assert {f["path"] for f in build["files"]} == {
        "rollouts/train-00000.parquet", "concepts/train-00000.parquet",
        "prompts/train-00000.parquet"}
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "build.json", "concepts", "prompts", "rollouts"]


def _small(tmp_path: Path) -> Path:
    d = tmp_path / "small"
    _top_files(d)
    write_results(d, "diffmean", "gemma-2-2b-it", [0], [0.2, 0.4])
    write_judgments(d, "diffmean", "gemma-2-2b-it", [0], [0.2, 0.4])
    return d


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".ds"))


def test_malformed_result_file_names_file_and_field(tmp_path, capsys):
    d = _small(tmp_path)
    bad = d / "result" / "diffmean" / "gemma-2-2b-it" / "0" / "10-0.4.json"
    doc = json.loads(bad.read_text())
    del doc["results"][3]["sample_id"]
    bad.write_text(json.dumps(doc))
    out = tmp_path / "ds"
    assert main(["import", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "results[3].sample_id" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_malformed_judgments_cache_names_file_and_field(tmp_path, capsys):
    d = _small(tmp_path)
    cache = d / "cache" / "judgments__diffmean__gemma-2-2b-it__L10.json"
    blob = json.loads(cache.read_text())
    blob["judgments"]["0"]["0.2"]["5"] = "maybe"
    cache.write_text(json.dumps(blob))
    out = tmp_path / "ds"
    assert main(["import", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert cache.name in err and "judgments.0.0.2.5" in err and "'maybe'" in err
    assert not out.exists() and _leftovers(tmp_path) == []
    # an existing folder is not replaced unless asked
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    blob["judgments"]["0"]["0.2"]["5"] = 1
    cache.write_text(json.dumps(blob))
    assert main(["import", str(d), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["import", str(d), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "rollouts").is_dir()


@needs_zstd
def test_hub_id_fetches_only_the_needed_files(tmp_path, monkeypatch, capsys):
    """A Hub id through a pre-populated offline cache holding the whole release layout
    (feature caches, banks, another pair's tarball): only the chosen pair's tarball and
    judgment cache, concepts, prompts and the card are used."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = write_authors_cache(cache, n_prompts=805, bank_size=2)
    snap = repo_folder(cache) / "snapshots" / commit
    (snap / "README.md").write_text("---\nlicense: mit\n---\n")
    work = tmp_path / "work"
    _top_files(work)
    _pair_a(work)
    m, model, cids, alphas = B
    write_results(work, m, model, cids, alphas)
    write_judgments(work, m, model, cids, alphas)
    for mm, mo in ((A[0], A[1]), (m, model)):
        pack_results(work, mm, mo, snap)
    shutil.copytree(work / "cache", snap / "cache")
    (snap / "cache" / "features__diffmean__gemma-2-2b-it__L10.npz").write_bytes(b"not read")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    out = tmp_path / "ds"
    assert main(["import", REPO, "--out", str(out), "--model", "gemma-2-2b-it"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["source"]["commit"] == commit
    assert summary["source"]["fetched"] == [
        "concepts.json", "alpaca_eval.json", "README.md",
        "cache/judgments__diffmean__gemma-2-2b-it__L10.json",
        "result__diffmean__gemma-2-2b-it.tar.zst"]
    assert [p["model"] for p in summary["pairs"]] == ["gemma-2-2b-it"]
    rollouts = datasets.load_dataset(str(out), "rollouts", split="train")
    _check_rows(rollouts.to_list(), [A])
    assert f"commit `{commit}`" in (out / "README.md").read_text()


def test_upload_goes_through_publish_path_without_leaking_the_token(tmp_path, monkeypatch):
    """With `--repo`, the folder goes to the Hub by the upload `publish` uses, after the
    same last scan for the token; the token is in no file."""
    from asteer_build.io.authors.importer import import_and_upload

    token = "hf_" + "x" * 30
    monkeypatch.setenv("HF_TOKEN", token)
    calls = []

    def fake_upload(folder, repo, *, private, token):
        calls.append((folder, repo, private, token))
        return "url"

    out = tmp_path / "ds"
    res = import_and_upload(str(_small(tmp_path)), str(out), repo="org/steerboost-rollouts",
                            private=True, upload=fake_upload)
    assert res.uploaded and calls == [(str(out), "org/steerboost-rollouts", True, token)]
    for p in out.rglob("*"):
        assert not p.is_file() or token.encode() not in p.read_bytes(), p
    with pytest.raises(ValueError, match="--repo: expected ORG/NAME"):
        import_and_upload(str(tmp_path / "small"), str(tmp_path / "ds2"), repo="bad")


def test_tokenizer_fills_response_tokens(tmp_path, tiny_model, capsys):
    """Their files hold no lengths; `--tokenizer MODEL=PATH` counts each response the way
    their `include_token_stats` does, so the strength search has lengths."""
    from transformers import AutoTokenizer

    out = tmp_path / "ds"
    assert main(["import", str(_small(tmp_path)), "--out", str(out),
                 "--tokenizer", f"gemma-2-2b-it={tiny_model}"]) == 0
    pair = json.loads(capsys.readouterr().out)["pairs"][0]
    assert pair["counted_tokens"] == 100 and pair["tokenizer"] == tiny_model
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = datasets.load_dataset(str(out), "rollouts", split="train").to_list()
    assert len(rows) == 100
    for r in rows:
        assert r["response_tokens"] == len(tok.encode(r["response"], add_special_tokens=False))
        assert r["response_tokens"] > 5
    assert f"100 counted with `{tiny_model}`" in (out / "README.md").read_text()
    assert main(["import", str(tmp_path / "small"), "--out", str(tmp_path / "x"),
                 "--tokenizer", "Llama-3.2-3B-Instruct=whatever"]) == 2
    assert "no results for model(s) ['Llama-3.2-3B-Instruct']" in capsys.readouterr().err


def test_upload_without_a_token_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """`import --repo` and `publish` check the repo id and the token in one place
    (`hub.upload_token`), before the long conversion or assembly; the user sees why."""
    from huggingface_hub import constants

    from asteer_build.io.publish import hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    msg = "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)"
    out = tmp_path / "ds"
    assert main(["import", str(_small(tmp_path)), "--out", str(out), "--repo", "org/x"]) == 2
    assert capsys.readouterr().err.startswith(f"asteer-build: error: {msg}")
    assert not out.exists() and _leftovers(tmp_path) == []
    with pytest.raises(ValueError) as e:
        hub.publish(str(tmp_path / "no-such-run"), "org/x")  # refused before reading it
    assert str(e.value) == msg
    assert hub.upload_token("org/x", dry_run=True) is None
    with pytest.raises(ValueError, match=r"^--repo: expected ORG/NAME \(got None\)$"):
        hub.upload_token(None, dry_run=True)
