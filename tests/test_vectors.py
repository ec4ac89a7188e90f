"""The vectors stage on real vLLM (CPU): pooled on the engine vs the HF reference, bit-
identical rebuilds, per-concept resume, the local offline bank writer, steering with the
vectors in the tiny world, and clear errors for bad input.

One engine for the module, on a tiny world built to be steerable (init 0.02, tied
embeddings x3: `TinyWorldSpec`): where the blocks' random output swamps the embeddings,
no DiffMean vector moves a concept's token rate and the steering checks would be vacuous."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from asteer_build.engine import SteeredEngine, SteerSpec
from asteer_build.inputs.sources import (
    Concept,
    SourceError,
    load_concepts,
    load_prompts,
    tiny_concepts,
)
from asteer_build.inputs.tinyworld import TinyWorldSpec, build_tiny_model
from asteer_build.vectors import (
    Bank,
    BankError,
    EngineWriter,
    VectorSettings,
    build_banks,
    build_vectors,
    load_vectors,
)

from .conftest import PROMPTS, chat_ids

LAYER = 2
STEERABLE = TinyWorldSpec(initializer_range=0.02, embed_scale=3.0)
METHODS = ["diffmean", "probe"]


@pytest.fixture(scope="module")
def model() -> str:
    return str(build_tiny_model(STEERABLE))


@pytest.fixture(scope="module")
def engine(engines, model):
    """In the test process (conftest.EngineRegistry): nothing here needs the engine core
    in a process of its own."""
    return engines.get(model, inprocess=True)


class CountingEngine:
    """The real engine, counting how many texts it was asked to pool."""

    def __init__(self, engine: SteeredEngine) -> None:
        self.engine, self.pooled = engine, 0

    def pool_hidden(self, prompts, layer, skip=1, **kw):
        self.pooled += len(prompts)
        return self.engine.pool_hidden(prompts, layer, skip, **kw)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _read(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_vllm_vectors_match_hf_reference(engine, model, tmp_path):
    cs = tiny_concepts()[:4]
    methods = [*METHODS, "pca"]
    a = build_vectors(model, cs, tmp_path / "vllm", VectorSettings(LAYER, methods, bank_size=12),
                      engine=engine)
    b = build_vectors(model, cs, tmp_path / "hf", VectorSettings(
        LAYER, methods, pool="hf", bank_size=12, device="cpu"))
    va, _ = load_vectors(_read(tmp_path / "vllm"))
    vb, _ = load_vectors(_read(tmp_path / "hf"))
    assert sorted(va) == sorted(vb) == sorted(f"{m}/{c.concept_id}" for m in methods
                                                for c in cs)
    for k in va:
        assert va[k].dtype == torch.float32 and va[k].shape == (128,)
        torch.testing.assert_close(va[k], vb[k], rtol=1e-4, atol=2e-5)
    for c in cs:
        ea, eb = a["probe"][c.concept_id], b["probe"][c.concept_id]
        assert ea["probe_accuracy"] == eb["probe_accuracy"] and ea["probe_accuracy"] > 0.6
        assert ea["bank_size"] == 12 and ea["layer"] == LAYER and ea["pool"] == "vllm"
        assert a["diffmean"][c.concept_id]["probe_accuracy"] is None
        assert a["diffmean"][c.concept_id]["norm"] == pytest.approx(
            float(va[f"diffmean/{c.concept_id}"].double().norm()))
        # PCA at DiffMean's length, a direction of its own
        assert a["pca"][c.concept_id]["norm"] == pytest.approx(
            a["diffmean"][c.concept_id]["norm"], rel=1e-5)
    # the methods are different vectors, not one written twice
    c0 = cs[0].concept_id
    assert not torch.allclose(va[f"diffmean/{c0}"], va[f"probe/{c0}"])
    assert not torch.allclose(va[f"diffmean/{c0}"], va[f"pca/{c0}"])


def test_pca_is_the_first_component_of_the_paired_differences():
    """Pairs whose difference varies in strength along one axis: PCA finds that axis,
    points it to the positive side and gives it DiffMean's length; swapping the sides
    flips it; too few or identical pairs are refused."""
    from asteer_build.vectors.methods import diffmean, make_vector, pca_direction
    from asteer_build.vectors.settings import ProbeSettings

    rng = np.random.default_rng(0)
    hidden, n = 16, 24
    u = rng.standard_normal(hidden)
    u /= np.linalg.norm(u)
    neg = rng.standard_normal((n, hidden)).astype(np.float32)
    strength = np.linspace(0.5, 3.0, n)[:, None]
    pos = (neg + 4 * strength * u + 0.05 * rng.standard_normal((n, hidden))).astype(np.float32)
    v = pca_direction(pos, neg).double().numpy()
    assert np.linalg.norm(v) == pytest.approx(float(diffmean(pos, neg).double().norm()),
                                              rel=1e-6)
    assert v @ u / np.linalg.norm(v) > 0.99
    d = pos.astype(np.float64) - neg.astype(np.float64)
    first = np.linalg.svd(d - d.mean(0))[2][0]  # numpy's own PCA of the centred pairs
    assert abs(v @ first) / np.linalg.norm(v) == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(pca_direction(neg, pos), -pca_direction(pos, neg))
    vec, acc = make_vector("pca", pos, neg, ProbeSettings())
    assert acc is None and torch.equal(vec, pca_direction(pos, neg))
    with pytest.raises(ValueError, match=r"pca: needs at least 2 contrast pairs, got 1"):
        pca_direction(pos[:1], neg)
    with pytest.raises(ValueError, match="pca: the 24 contrast differences are all equal"):
        pca_direction(np.round(neg) + 1, np.round(neg))  # exact: integers in float32


def _save_keyed(path: Path, vecs: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vecs.items()}, str(path))
    return path


def test_a_vector_file_is_checked_naming_the_concept_and_the_layer(tmp_path):
    """`file` vectors: every configured concept at the configured layer, one finite,
    non-zero float vector each; anything else is refused naming concept, layer and key."""
    from asteer_build.vectors.vector_files import VectorFile, VectorFileError, read_vector_file

    good = {"tw-ocean/2": torch.ones(8), "tw-robot/2": torch.arange(8.0),
            "tw-robot/3": torch.ones(8)}
    f = _save_keyed(tmp_path / "v.safetensors", good)
    vecs, source = read_vector_file(VectorFile(path=str(f)), ["tw-ocean", "tw-robot"], 2, 8)
    assert torch.equal(vecs["tw-robot"], torch.arange(8.0))
    assert source == {"source": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    cases = [
        (good, ["tw-ocean", "tw-city"], 2, 8,
         "no vector for concept 'tw-city' at layer 2 (key 'tw-city/2'; it has none for it)"),
        (good, ["tw-robot"], 4, 8,
         "no vector for concept 'tw-robot' at layer 4 (key 'tw-robot/4'; it has layers "
         "[2, 3] for it)"),
        ({"tw-ocean/2": torch.ones(2, 4)}, ["tw-ocean"], 2, None,
         "concept 'tw-ocean' at layer 2 (key 'tw-ocean/2'): shape (2, 4), expected one vector"),
        ({"tw-ocean/2": torch.ones(6)}, ["tw-ocean"], 2, 8,
         "(key 'tw-ocean/2'): 6 values, the model's residual stream has 8"),
        ({"tw-ocean/2": torch.tensor([1.0, float("nan")])}, ["tw-ocean"], 2, None,
         "(key 'tw-ocean/2'): NaN or inf values"),
        ({"tw-ocean/2": torch.zeros(4)}, ["tw-ocean"], 2, None, "(key 'tw-ocean/2'): all zeros"),
        ({"tw-ocean/2": torch.ones(4, dtype=torch.int64)}, ["tw-ocean"], 2, None,
         "(key 'tw-ocean/2'): dtype torch.int64, expected a float tensor"),
    ]
    for i, (tensors, ids, layer, hidden, msg) in enumerate(cases):
        bad = _save_keyed(tmp_path / f"bad{i}.safetensors", tensors)
        with pytest.raises(VectorFileError) as e:
            read_vector_file(VectorFile(path=str(bad)), ids, layer, hidden)
        assert str(e.value).startswith(f"vectors.file: {bad}: ") and msg in str(e.value), \
            (msg, str(e.value))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(VectorFileError, match="junk.safetensors is not a safetensors file"):
        read_vector_file(VectorFile(path=str(tmp_path / "junk.safetensors")), ["a"], 2)
    with pytest.raises(VectorFileError, match="vectors.file.path: no such file"):
        read_vector_file(VectorFile(path=str(tmp_path / "none.safetensors")), ["a"], 2)
    # the settings: the method and the file go together
    for kw, msg in [
        ({"methods": ["diffmean", "file"]}, "vectors.file: required by method 'file'"),
        ({"methods": ["diffmean"], "file": {"path": str(f)}},
         r"vectors.file is set \(.*\) but methods \['diffmean'\] has no 'file'"),
        ({"methods": ["file"], "file": {"path": "a", "hub": "o/r"}},
         "set exactly one of path and hub"),
        ({"methods": ["file"], "file": {"url": "a"}}, r"vectors.file.url: unknown field"),
    ]:
        with pytest.raises(ValueError, match=msg):
            VectorSettings(LAYER, **kw)
    assert VectorSettings(LAYER, ["file"], file={"hub": "org/vecs", "revision": "v1"}
                          ).file.where() == "hf://org/vecs@v1/vectors.safetensors"


def test_a_vector_file_from_a_hub_repo(tmp_path, monkeypatch):
    """`{hub: REPO}`: fetched with hf_hub_download (here from a hub cache laid out as it
    leaves one, offline), its source named as an hf:// path; a file the repo does not
    have is an error naming it."""
    import huggingface_hub.constants as hc

    from asteer_build.vectors.vector_files import VectorFile, VectorFileError, read_vector_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / "models--org--vecs"
    (root / "snapshots" / commit).mkdir(parents=True)
    snap = _save_keyed(root / "snapshots" / commit / "vectors.safetensors",
                       {"tw-ocean/2": torch.arange(1.0, 9.0)})
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    vecs, source = read_vector_file(VectorFile(hub="org/vecs"), ["tw-ocean"], 2, 8)
    assert torch.equal(vecs["tw-ocean"], torch.arange(1.0, 9.0))
    assert source == {"source": "hf://org/vecs/vectors.safetensors",
                      "sha256": hashlib.sha256(snap.read_bytes()).hexdigest()}
    with pytest.raises(VectorFileError, match=r"vectors.file: cannot fetch "
                       r"hf://org/vecs/sae\.safetensors: LocalEntryNotFoundError"):
        read_vector_file(VectorFile(hub="org/vecs", filename="sae.safetensors"), ["a"], 2)


def test_file_vectors_are_written_as_given_beside_pooled_ones(engine, model, tmp_path):
    """Our DiffMean vectors brought back as a `file`: the same tensors, bit for bit, with
    their source in the index; a file alone needs no banks; a file as wide as another model
    is refused against the pooled width."""
    cs = tiny_concepts()[:3]
    idx = build_vectors(model, cs, tmp_path / "dm", VectorSettings(LAYER, ["diffmean"],
                                                                   bank_size=8), engine=engine)
    dm, _ = load_vectors(_read(tmp_path / "dm"))
    f = _save_keyed(tmp_path / "mine.safetensors",
                    {f"{c.concept_id}/{LAYER}": dm[f"diffmean/{c.concept_id}"] for c in cs})
    both = build_vectors(model, cs, tmp_path / "both", VectorSettings(
        LAYER, ["diffmean", "file"], bank_size=8, file={"path": str(f)}), engine=engine)
    got, norms = load_vectors(_read(tmp_path / "both"))
    for c in cs:
        assert torch.equal(got[f"file/{c.concept_id}"], got[f"diffmean/{c.concept_id}"])
        e = both["file"][c.concept_id]
        assert e["source"] == str(f) and e["key"] == f"{c.concept_id}/{LAYER}"
        assert e["norm"] == pytest.approx(idx["diffmean"][c.concept_id]["norm"], rel=1e-6)
    alone = build_vectors("no/such-model", cs, tmp_path / "alone", VectorSettings(
        LAYER, ["file"], file={"path": str(f)}))  # no banks, no model, no engine
    assert list(alone) == ["file"] and (tmp_path / "alone" / "file.safetensors").exists()
    wide = _save_keyed(tmp_path / "wide.safetensors",
                       {f"{c.concept_id}/{LAYER}": torch.ones(64) for c in cs})
    from asteer_build.vectors.vector_files import VectorFileError

    with pytest.raises(VectorFileError, match=r"64 values, the model's residual stream has 128"):
        build_vectors(model, cs, tmp_path / "w", VectorSettings(
            LAYER, ["diffmean", "file"], bank_size=8, file={"path": str(wide)}), engine=engine)


def _authors_format_banks(root: Path, concepts: list[Concept], n: int) -> None:
    """Bank files as the authors publish them (`training/{cid}.json`, positive/negative
    lists), synthetic texts from the tiny world's words so they tokenize to real tokens."""
    import random

    from asteer_build.inputs.tinyworld import FILLER_WORDS

    (root / "training").mkdir(parents=True, exist_ok=True)
    for c in concepts:
        rng = random.Random(f"authors|{c.concept_id}")

        def words(k: int, rng: random.Random = rng) -> str:
            return " ".join(rng.choice(FILLER_WORDS) for _ in range(k))

        pos = [f"{words(rng.randint(2, 6))} {c.concept} {words(rng.randint(3, 9))} "
               f"{c.concept}." for _ in range(n)]
        neg = [f"{words(rng.randint(4, 14))}." for _ in range(n)]
        (root / "training" / f"{c.concept_id}.json").write_text(
            json.dumps({"positive": pos, "negative": neg}, indent=1))


def _authors_pooling(model: str, texts: list[str], layer: int) -> np.ndarray:
    """The authors' pooling, written out in the test from its description, in float32 on
    transformers: raw text with the tokenizer's default special tokens, the output of
    decoder layer `layer` (a forward hook), mean over positions 1.. . The tiny world's
    tokenizer declares a BOS it does not add, so it goes in front, as the stage does for
    such tokenizers (the reference's models add theirs or have none: pooling.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()
    got: list[torch.Tensor] = []
    h = lm.model.layers[layer].register_forward_hook(
        lambda mod, args, out: got.append(out[0] if isinstance(out, tuple) else out))
    rows = []
    try:
        with torch.no_grad():
            for t in texts:
                ids = tok(t, return_tensors="pt", add_special_tokens=True).input_ids
                assert int(ids[0, 0]) != tok.bos_token_id  # the tiny world's tokenizer
                ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], 1)
                lm(input_ids=ids)
                rows.append(got.pop()[0, 1:, :].mean(0))
    finally:
        h.remove()
    return torch.stack(rows).numpy()


def test_authors_banks_pooled_on_vllm_match_the_hf_reference(engine, model, tmp_path,
                                                            monkeypatch):
    """Vectors from authors-format bank files, through the stage's
    vLLM pooling, equal the HF-transformers pooling reference in float32 (relative error
    below 1e-4); the banks come offline from a pre-populated Hugging Face cache."""
    import huggingface_hub.constants as hc

    from asteer_build.vectors import ProbeSettings, train_probe
    from asteer_build.vectors.pooling import tokenize_texts

    try:
        from .test_bankfiles import REPO, _authors_probe, write_hub_cache
    except ImportError:
        from test_bankfiles import REPO, _authors_probe, write_hub_cache

    cs = [Concept(str(i), w) for i, w in enumerate(["ocean", "music", "robot", "dragon"])]
    n = 12
    data = tmp_path / "authors"
    _authors_format_banks(data, cs, n)
    cache = write_hub_cache(tmp_path / "hf-hub", {
        f"training/{c.concept_id}.json": (data / "training" / f"{c.concept_id}.json")
        .read_text() for c in cs})
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)

    idx = build_vectors(model, cs, tmp_path / "hub", VectorSettings(
        LAYER, METHODS, banks={"hub": REPO}), engine=engine)
    vecs, _ = load_vectors(_read(tmp_path / "hub"))
    # the local-folder form reads the same files: the same vector files, byte for byte
    build_vectors(model, cs, tmp_path / "folder", VectorSettings(
        LAYER, METHODS, banks={"path": str(data)}), engine=engine)
    assert _read(tmp_path / "folder") == _read(tmp_path / "hub")

    tok = engine.get_tokenizer()
    worst = {"pooled": 0.0, "diffmean": 0.0, "probe": 0.0}
    for c in cs:
        bank = json.loads((data / "training" / f"{c.concept_id}.json").read_text())
        assert idx["diffmean"][c.concept_id]["bank_size"] == n
        ref_pos = _authors_pooling(model, bank["positive"], LAYER)
        ref_neg = _authors_pooling(model, bank["negative"], LAYER)
        # pooled matrices: the engine's vs the reference, row by row
        for side, ref in (("positive", ref_pos), ("negative", ref_neg)):
            ids = tokenize_texts(tok, bank[side])
            assert all(x == [tok.bos_token_id, *tok(t).input_ids]
                       for x, t in zip(ids, bank[side], strict=True))
            got = engine.pool_hidden(ids, LAYER, skip=1)
            rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
            assert rel.max() < 1e-4, (c.concept_id, side, rel.max())
            worst["pooled"] = max(worst["pooled"], float(rel.max()))
        # DiffMean as the authors compute it (float32 means of the pooled rows)
        ref_dm = torch.from_numpy(ref_pos).mean(0) - torch.from_numpy(ref_neg).mean(0)
        dm = vecs[f"diffmean/{c.concept_id}"]
        rel_dm = float((dm - ref_dm).norm() / ref_dm.norm())
        assert rel_dm < 1e-4, (c.concept_id, rel_dm)
        worst["diffmean"] = max(worst["diffmean"], rel_dm)
        # the probe: on the reference's pooled rows our trainer IS the authors' code
        # (seeded); from the engine's rows (the stage) it lands within the pooling error
        x = torch.from_numpy(np.concatenate([ref_pos, ref_neg]))
        y = torch.tensor([1.0] * n + [0.0] * n)
        theirs = _authors_probe(x, y, seed=0)
        assert torch.equal(train_probe(ref_pos, ref_neg, ProbeSettings(seed=0))[0], theirs)
        pr = vecs[f"probe/{c.concept_id}"]
        rel_pr = float((pr - theirs).norm() / theirs.norm())
        assert rel_pr < 1e-3, (c.concept_id, rel_pr)
        worst["probe"] = max(worst["probe"], rel_pr)
    print("relative error, vLLM stage vs HF reference:", json.dumps(worst))


def test_rebuild_is_bit_identical_and_interrupted_stage_resumes(engine, model, tmp_path):
    cs = tiny_concepts()[:6]
    s10 = VectorSettings(LAYER, METHODS, bank_size=10)
    cached = VectorSettings(LAYER, METHODS, bank_size=10, cache_dir=tmp_path / "cache")
    build_vectors(model, cs, tmp_path / "r1", s10, engine=engine)
    build_vectors(model, cs, tmp_path / "r2", VectorSettings(
        LAYER, METHODS, bank_size=10, cache_dir=tmp_path / "cache-r2"), engine=engine)
    first = _read(tmp_path / "r1")
    assert first == _read(tmp_path / "r2")  # bytes, every file

    # interrupted after 2 concepts: their cache files are committed, the rest redone
    seen: list[str] = []

    def stop(cid, entries):
        seen.append(cid)
        if len(seen) == 2:
            raise KeyboardInterrupt

    counting = CountingEngine(engine)
    with pytest.raises(KeyboardInterrupt):
        build_vectors(model, cs, tmp_path / "r3", cached, engine=counting, on_concept=stop)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    assert not list((tmp_path / "cache").glob(".*tmp*"))
    counting.pooled = 0
    redone: list[str] = []
    build_vectors(model, cs, tmp_path / "r3", cached, engine=counting,
                  on_concept=lambda cid, e: redone.append(cid))
    assert redone == [c.concept_id for c in cs[2:]]
    assert counting.pooled == 4 * 2 * 10  # only the four unfinished concepts
    got, _ = load_vectors(_read(tmp_path / "r3"))
    want, _ = load_vectors(first)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    for c in cs[:2]:  # read back from the cache, exactly
        assert torch.equal(got[f"diffmean/{c.concept_id}"], want[f"diffmean/{c.concept_id}"])
    # a fully cached rerun pools nothing
    counting.pooled = 0
    build_vectors(model, cs, tmp_path / "r4", cached, engine=counting)
    assert counting.pooled == 0
    assert _read(tmp_path / "r4") == _read(tmp_path / "r3")


def test_local_engine_writes_banks_offline(engine, model, tmp_path):
    cs = [Concept("tw-ocean", "ocean"), Concept("tw-robot", "robot")]
    w = EngineWriter(engine, "tiny-local", max_tokens=20)
    banks = build_banks(cs, w, tmp_path / "banks", n=3)
    assert w.calls == 2 * 2 * 3
    for c in cs:
        b = banks[c.concept_id]
        assert len(b.positives) == len(b.negatives) == 3
        assert all(t.strip() for t in b.positives + b.negatives)
        assert b.header["writer"] == "engine" and b.header["model"] == "tiny-local"
        assert b.header["max_tokens"] == 20 and b.header["prompt"]["json_suffix"] is None
    w2 = EngineWriter(engine, "tiny-local", max_tokens=20)
    assert build_banks(cs, w2, tmp_path / "banks", n=3).keys() == banks.keys()
    assert w2.calls == 0
    # and the vectors stage reads them from the bank folder
    idx = build_vectors(model, cs, tmp_path / "v", VectorSettings(
        LAYER, ["diffmean"], bank_dir=tmp_path / "banks"), engine=engine)
    assert set(idx["diffmean"]) == {c.concept_id for c in cs}
    assert idx["diffmean"]["tw-ocean"]["bank_size"] == 3


def test_diffmean_steering_raises_concept_rate(engine, model, tmp_path):
    cs = tiny_concepts()
    build_vectors(model, cs, tmp_path / "v", VectorSettings(LAYER, ["diffmean"], bank_size=16),
                  engine=engine)
    vecs, _ = load_vectors(_read(tmp_path / "v"))
    engine.register_vectors(vecs)
    tok = engine.get_tokenizer()
    ids = chat_ids(model, PROMPTS[:4])
    from vllm import SamplingParams

    alphas = (0.0, 16.0, 64.0)
    prompts, specs, params, where = [], [], [], []
    for c in cs:
        for a in alphas:
            for i, x in enumerate(ids):
                for s in range(2):
                    prompts.append({"prompt_token_ids": x})
                    specs.append(SteerSpec(f"diffmean/{c.concept_id}", a, LAYER) if a else None)
                    params.append(SamplingParams(temperature=1.0, max_tokens=24,
                                                 seed=1000 * i + s))
                    where.append((c.concept_id, a))
    outs = engine.generate(prompts, params, steer=specs)
    counts: dict[tuple[str, float], list[int]] = {}
    for (cid, a), o in zip(where, outs, strict=True):
        concept = cid.removeprefix("tw-")
        tid = tok(" " + concept).input_ids
        assert len(tid) == 1, concept
        got = counts.setdefault((cid, a), [0, 0])
        got[0] += sum(t == tid[0] for t in o.outputs[0].token_ids)
        got[1] += len(o.outputs[0].token_ids)
    rate = {k: n / max(1, t) for k, (n, t) in counts.items()}
    table = {c.concept_id: [round(rate[(c.concept_id, a)], 3) for a in alphas] for c in cs}
    print(json.dumps(table))
    rising = [cid for cid, r in table.items() if r[0] <= r[1] <= r[2] and r[2] >= r[0] + 0.05]
    assert len(rising) >= 9, table
    assert np.mean([r[2] for r in table.values()]) > 5 * np.mean(
        [r[0] for r in table.values()]) + 0.05, table


def test_bad_input_fails_clearly(engine, model, tmp_path):
    cs = tiny_concepts()[:2]
    with pytest.raises(ValueError, match="layer 6 is beyond the model .* 6 decoder layers"):
        build_vectors(model, cs, tmp_path / "x", VectorSettings(6, ["diffmean"], bank_size=4),
                      engine=engine)
    with pytest.raises(BankError, match="tw-emoji: contrast bank has no positives"):
        build_vectors(model, cs[:1], tmp_path / "x", VectorSettings(LAYER, ["diffmean"]),
                      engine=engine, banks={"tw-emoji": ([], ["the water is good"])})
    with pytest.raises(BankError, match="no contrast bank at"):
        build_vectors(model, cs, tmp_path / "x", VectorSettings(
            LAYER, ["diffmean"], bank_dir=tmp_path / "nowhere"), engine=engine)
    # a tokenizer without a BOS (as Qwen3's): a one-token text has nothing to pool
    from transformers import AutoTokenizer

    from asteer_build.vectors.pooling import Pooling, engine_pooler
    from asteer_build.vectors.stage import compute_vectors

    no_bos = AutoTokenizer.from_pretrained(model, bos_token=None)
    assert no_bos.bos_token_id is None
    with pytest.raises(BankError, match=r"tw-emoji: negative text 1 \('water'\) is 1 "
                                        "token.* pooling skips position 0"):
        compute_vectors(model, {"tw-emoji": Bank("tw-emoji", ["the emoji is good"],
                                                 ["the water is good", "water"])},
                        tmp_path / "x", VectorSettings(LAYER, ["diffmean"]),
                        Pooling(engine_pooler(engine), no_bos, engine.num_layers, "vllm"))
    with pytest.raises(ValueError, match=r"\[.ica.\] \(known: diffmean, probe, pca, file\)"):
        build_vectors(model, cs, tmp_path / "x", VectorSettings(LAYER, ["ica"], bank_size=4),
                      engine=engine)
    # sources
    (tmp_path / "dup.json").write_text(json.dumps([
        {"concept_id": "a", "concept": "ocean"}, {"concept_id": "a", "concept": "music"}]))
    with pytest.raises(SourceError, match="duplicate concept_id 'a' in rows 0 and 1"):
        load_concepts("dup.json", str(tmp_path))
    (tmp_path / "empty.csv").write_text("concept_id,concept\na,ocean\nb,  \n")
    with pytest.raises(SourceError, match="row 1: empty 'concept'"):
        load_concepts("empty.csv", str(tmp_path))
    (tmp_path / "alpaca.json").write_text(json.dumps(
        [{"instruction": f"question {i}", "dataset": "x"} for i in range(20)]))
    with pytest.raises(SourceError, match="column 'prompt_text' .* not found; columns: "
                                          r"\['dataset', 'instruction'\]"):
        load_prompts({"path": "alpaca.json", "columns": {"prompt": "prompt_text"}},
                     str(tmp_path))
    with pytest.raises(SourceError, match="missing column 'prompt_id'"):
        load_prompts("alpaca.json", str(tmp_path))
    # the working form: named column, ids from source rows, seeded sample
    spec = {"path": "alpaca.json", "columns": {"prompt": "instruction"}, "sample": 5,
            "seed": 42}
    ps = load_prompts(spec, str(tmp_path))
    assert len(ps) == 5 and ps == load_prompts(spec, str(tmp_path))
    # ids are positions in the draw (the authors' sample_id); the file row is kept
    assert [p.prompt_id for p in ps] == ["0", "1", "2", "3", "4"]
    assert all(p.prompt == f"question {p.source_index}" for p in ps)
    assert [p.source_index for p in ps] == random.Random(42).sample(range(20), 5)
    assert [p.source_index for p in ps] != [p.source_index for p in load_prompts(
        {**spec, "seed": 7}, str(tmp_path))]
