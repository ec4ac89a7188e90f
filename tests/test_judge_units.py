"""Judge pieces that need no server: parsing, rules, cache repair, agreement, config."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys

import pyarrow as pa
import pytest

from judge.agreement import cohen_kappa, compare, confusion_matrix, stratified_sample
from judge.cache import JudgmentCache, cache_key
from judge.config import JudgeConfig
from judge.judges import RulesJudge
from judge.rubric import JudgmentParseError, build_messages, parse_judgment
from judge.rules import rules_label
from judge.shards import judge_shards

try:  # tests/ may or may not be a package
    from .judge_support import make_rows, read_dir, run_cli, write_shard
except ImportError:
    from judge_support import make_rows, read_dir, run_cli, write_shard


def test_parse_strict_and_tolerant():
    assert parse_judgment('{"label":1,"explanation":"ok"}').label == 1
    assert parse_judgment('Sure. ```json\n{"label": 2, "explanation": "soup"}\n``` done').label == 2
    assert parse_judgment("label: 0").label == 0
    assert parse_judgment('{"label":"2","explanation":"x"}').label == 2


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "I think it is fine.",
        '{"label": 3, "explanation": "x"}',
        '{"label": true, "explanation": "x"}',
        '{"explanation": "no label"}',
        '{"label": 0, "explanation": "a"} or maybe {"label": 2, "explanation": "b"}',
        "label: 1 ... actually label: 2",
        None,
    ],
)
def test_parse_never_guesses(text):
    with pytest.raises(JudgmentParseError):
        parse_judgment(text)


def test_rubric_sees_only_prompt_concept_response():
    msgs = build_messages("PROMPT-X", "ocean", "RESPONSE-Y")
    user = msgs[-1]["content"]
    assert "PROMPT-X" in user and "ocean" in user and "RESPONSE-Y" in user
    assert "gibberish" in msgs[0]["content"].lower()
    # a response that looks like a placeholder is inserted as is, never filled again
    tricky = build_messages("P {concept}", "ocean", "R {prompt} {response}")[-1]["content"]
    assert "P {concept}" in tricky and "R {prompt} {response}" in tricky


# Each decision rule of the reference testbed's rubric (the authors'
# submit_gpt_judgment.py), as our rubric words it.
RUBRIC_RULES = {
    "three labels": ["0 = under-steered", "1 = steered successfully", "2 = over-steered"],
    "under: coherent, on the prompt, concept absent": [
        "makes sense and deals with the prompt, but the target concept does not show up"],
    "success: present AND coherent and relevant": [
        "clearly part of the response AND the response still makes sense, stays on the prompt"],
    "natural integration": ["woven into the answer so that it reads naturally"],
    "over: no longer answers, nonsensical / off-topic / unsuitable": [
        "no longer answers the prompt: it is nonsensical, off-topic, unsuitable"],
    "empty is over-steer": ["An empty response is 2."],
    "gibberish is over-steer, not under-steer": ["does not answer the prompt is 2, never 0"],
    "strict about coherence": ["Hold coherence to a high bar",
                               "does not make sense as an answer is 2"],
    "appropriateness of the concept for the prompt": [
        "whether the concept suits this prompt", "improves the answer or spoils it"],
    "cultural and linguistic appropriateness": ["cultural and linguistic appropriateness"],
    "an example per label": ['"uses emojis" and the reply is a plain answer',
                             '"humorous tone" and the reply answers the question',
                             "a stream of emojis that never gets to the question"],
    "evidence in the reason": ["concrete evidence in the response"],
}


@pytest.mark.parametrize("rule", sorted(RUBRIC_RULES))
def test_rubric_carries_each_of_the_reference_rules(rule):
    from judge.rubric import DEFAULT_RUBRIC

    text = " ".join((DEFAULT_RUBRIC.system or "").split())
    for phrase in RUBRIC_RULES[rule]:
        assert phrase in text, (rule, phrase)


def test_the_reason_is_asked_for_before_the_label():
    from judge.rubric import DEFAULT_RUBRIC, JUDGMENT_SCHEMA, response_format

    text = DEFAULT_RUBRIC.system or ""
    assert "Reason first, then decide" in text
    fmt = text[text.index("Answer format"):]
    assert fmt.index('"explanation"') < fmt.index('"label"')
    # structured output generates keys in schema order: the reason first there too
    assert list(JUDGMENT_SCHEMA["properties"]) == ["explanation", "label"]
    assert JUDGMENT_SCHEMA["required"] == ["explanation", "label"]
    assert response_format()["json_schema"]["schema"] is JUDGMENT_SCHEMA


def test_parse_reason_first_label_first_and_the_authors_key():
    j = parse_judgment('{"explanation": "the concept is woven in", "label": 1}')
    assert (j.label, j.explanation) == (1, "the concept is woven in")
    assert parse_judgment('{"label": 2, "explanation": "soup"}').label == 2
    # the reference rubric's format (through rubric_file): `judgment` is the label
    j = parse_judgment('{"explanation": "no emojis at all", "judgment": 0}')
    assert (j.label, j.explanation) == (0, "no emojis at all")
    assert parse_judgment('reason: gibberish. "judgment": 2').label == 2
    with pytest.raises(JudgmentParseError, match="disagree"):
        parse_judgment('{"explanation": "x", "label": 1, "judgment": 2}')


def test_rubric_version_names_the_rubric_and_hashes_its_text(tmp_path):
    from judge.rubric import DEFAULT_RUBRIC, RUBRIC_VERSION, Rubric

    assert RUBRIC_VERSION == DEFAULT_RUBRIC.version
    name, digest = RUBRIC_VERSION.split("+")
    assert name == "asteer-3way-v2" and len(digest) == 8
    edited = Rubric(DEFAULT_RUBRIC.name, DEFAULT_RUBRIC.user_template,
                    DEFAULT_RUBRIC.system + " ")
    assert edited.version != RUBRIC_VERSION  # any edit is another version
    f = tmp_path / "mine.txt"
    f.write_text('Concept {concept}; prompt {prompt}; response {response}. '
                 'Answer {"explanation": "...", "label": 0}')
    r = Rubric.from_file(f)
    assert r.version.startswith("mine+") and r.system is None
    (msg,) = r.messages("P", "C", "R")
    assert msg == {"role": "user", "content": 'Concept C; prompt P; response R. '
                   'Answer {"explanation": "...", "label": 0}'}


@pytest.mark.parametrize("text, msg", [
    (None, "cannot read"),
    ("   ", "is empty"),
    ("Grade {response} for {concept}", r"lacks the placeholder\(s\) \{prompt\}"),
    ("{prompt} {concept} {response_after}", r"lacks the placeholder\(s\) \{response\}"),
])
def test_bad_rubric_files_fail_at_config_time_naming_the_field(tmp_path, text, msg):
    from asteer_build.pipeline.config import ConfigError, parse_config

    from .pipeline_support import tiny_config

    if text is not None:
        (tmp_path / "r.txt").write_text(text)
    judge = {"kind": "llm", "model": "m", "rubric_file": "r.txt",
             "endpoints": [{"base_url": "http://127.0.0.1:9/v1"}]}
    with pytest.raises(ConfigError, match=f"judge.rubric_file: .*{msg}"):
        parse_config(tiny_config(tmp_path, judge=judge), base_dir=str(tmp_path))
    with pytest.raises(ValueError, match=f"judge.rubric_file: .*{msg}"):
        JudgeConfig.from_dict({"rubric_file": "r.txt"}).rubric(tmp_path)


def test_unsent_max_tokens_and_temperature_in_batch_files(tmp_path):
    """gpt-5 models (the reference's judge) reject both; null leaves them out."""
    from judge.batchfile import write_requests

    write_shard(tmp_path / "in" / "s0.parquet", make_rows(2))
    (path,) = write_requests(tmp_path / "in", tmp_path / "req.jsonl", model="gpt-5-mini",
                             max_tokens=None, temperature=None)
    body = json.loads(path.read_text().splitlines()[0])["body"]
    assert set(body) == {"model", "messages", "response_format"}
    assert body["messages"][0]["role"] == "system"
    cfg = JudgeConfig.from_dict({"model": "gpt-5-mini", "max_tokens": None,
                                 "temperature": None})
    assert (cfg.max_tokens, cfg.temperature) == (None, None)


def test_rules_labels():
    assert rules_label("ocean", "").label == 2
    assert rules_label("ocean", "ocean ocean ocean the ocean is ocean").label == 2
    varied = "the city is a good idea for people who travel and learn about food and money"
    assert rules_label("ocean", varied).label == 0
    assert rules_label("ocean", varied + " near the ocean today with a friend").label == 1
    assert rules_label("ocean", "the day the day the day the day the day").label == 2


def test_cache_key_covers_every_field():
    base = ("v1", "m", "p", "c", "r")
    k = cache_key(*base)
    for i in range(5):
        changed = list(base)
        changed[i] += "x"
        assert cache_key(*changed) != k


def test_cache_survives_torn_tail(tmp_path):
    path = tmp_path / "c.jsonl"
    with JudgmentCache(path) as c:
        c.put("k1", 1, "e", "m", "v")
        c.put("k2", 2, "e", "m", "v")
    with open(path, "ab") as f:
        f.write(b'{"key": "k3", "label": 0, "expl')  # killed mid-write
    with JudgmentCache(path) as c:
        assert len(c) == 2 and c.get("k2").label == 2 and c.get("k3") is None
        c.put("k4", 0, "e", "m", "v")
    with JudgmentCache(path) as c:
        assert sorted(c._mem) == ["k1", "k2", "k4"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_kappa_and_confusion():
    a = [0, 1, 2, 1, 0, 2, 1, 1]
    assert cohen_kappa(a, a) == 1.0
    assert confusion_matrix([0, 1, 2], [0, 2, 2]) == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    # Hand-computed: p_o = 0.6, p_e = 0.5*0.5 + 0.5*0.5 = 0.5 -> kappa 0.2
    assert cohen_kappa([0, 0, 0, 1, 1], [0, 0, 1, 1, 0]) == pytest.approx(
        (0.6 - (0.6 * 0.6 + 0.4 * 0.4)) / (1 - (0.6 * 0.6 + 0.4 * 0.4))
    )


def test_compare_excludes_failed_rows():
    a = pa.table({"id": ["a", "b", "c"], "label": pa.array([0, None, 2], pa.int8())})
    b = pa.table({"id": ["a", "b", "c"], "label": pa.array([0, 1, 1], pa.int8())})
    r = compare(a, b)
    assert r.n == 2 and r.excluded == 1 and r.accuracy == 0.5


def test_stratified_sample_covers_rare_class():
    labels = [0] * 90 + [1] * 8 + [2] * 2
    t = pa.table({"id": [str(i) for i in range(100)], "label": labels})
    s = stratified_sample(t, 30)
    got = [r["label"] for r in s]
    assert len(s) == 30 and got.count(2) == 2 and got.count(1) == 8
    assert len({r["id"] for r in s}) == 30


def test_config_refuses_literal_keys():
    with pytest.raises(ValueError):
        JudgeConfig.from_dict({"judge": {"endpoints": [{"base_url": "x", "api_key": "sk"}]}})
    cfg = JudgeConfig.from_dict(
        {
            "judge": {
                "model": "m",
                "endpoints": [
                    {"base_url": "http://h/v1", "api_key_env": "K", "max_concurrency": 3}
                ],
                "retry": {"max_attempts": 2},
            }
        }
    )
    assert cfg.endpoints[0].max_concurrency == 3 and cfg.retry.max_attempts == 2


def test_judge_package_imports_no_vllm():
    code = (
        "import sys, judge.cli, judge.pool, judge.shards, judge.batchfile, "
        "judge.agreement; print('vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_rules_run_is_idempotent(tmp_path):
    rows = make_rows(30)
    write_shard(tmp_path / "in" / "s0.parquet", rows)
    cache = JudgmentCache(tmp_path / "c.jsonl")
    r1 = asyncio.run(judge_shards(tmp_path / "in", tmp_path / "out", RulesJudge(), cache))
    r2 = asyncio.run(judge_shards(tmp_path / "in", tmp_path / "out", RulesJudge(), cache))
    out = read_dir(tmp_path / "out")
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert all(r["judge_status"] == "ok" and r["label"] in (0, 1, 2) for r in out)
    assert r1[0].ok == 30 and r2[0].skipped and r2[0].calls == 0
    assert {r["judge_rubric"] for r in out} == {"rules-v1"}  # its rules are its rubric
    assert len({r["label"] for r in out}) >= 2  # the measures actually separate rows


def test_agree_cli_writes_sample(tmp_path):
    rows = make_rows(40)
    write_shard(tmp_path / "in" / "s.parquet", rows)
    assert (
        run_cli(
            ["run", "--rules", "--in", str(tmp_path / "in"), "--out", str(tmp_path / "a")]
        ).returncode
        == 0
    )
    res = run_cli(
        [
            "agree",
            "--a",
            str(tmp_path / "a"),
            "--sample-csv",
            str(tmp_path / "s.csv"),
            "--sample-n",
            "12",
        ]
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["kappa"] == 1.0 and summary["n"] == 40
    with open(tmp_path / "s.csv") as f:
        sample = list(csv.DictReader(f))
    assert len(sample) == 12 and sample[0]["human_label"] == ""


def test_label_table_in_memory_with_a_batch_judge(tmp_path):
    """The table API: rows keep their order, failures stay failed with their error, a
    request a batch judge never answers stays pending, and the cache spares a second ask."""
    from asteer_build.core import contract
    from judge.judges import Outcome
    from judge.label import BatchJudge, LabelReport, alabel_table, label_table

    class Batch:
        judge_model = rubric_version = "batch-v1"

        def __init__(self) -> None:
            self.asked: list[int] = []

        async def judge_many(self, requests, on_done):
            self.asked.append(len(requests))
            for req in requests:  # a real one would submit, poll, then collect
                if req.response.endswith("ok"):
                    on_done(req.key, Outcome("ok", 1, "fine"))
                elif req.response.endswith("bad"):
                    on_done(req.key, Outcome("failed", error="no verdict"))

    responses = ["a ok", "b bad", "c lost", "a ok"]
    table = pa.table({"id": [f"r{i}" for i in range(4)], "prompt": ["p"] * 4,
                      "concept": ["c"] * 4, "response": responses})
    judge = Batch()
    assert isinstance(judge, BatchJudge) and not isinstance(RulesJudge(), BatchJudge)
    rep = LabelReport()
    out = label_table(table, judge, report=rep)
    assert out.column_names == ["id", "prompt", "concept", "response", *contract.JUDGE_COLUMNS]
    assert out.column("judge_status").to_pylist() == ["ok", "failed", "pending", "ok"]
    assert out.column("label").to_pylist() == [1, None, None, 1]
    assert out.column("judge_error").to_pylist() == [None, "no verdict", None, None]
    # the rubric version of ok and failed judgments, null while pending
    assert out.column("judge_rubric").to_pylist() == ["batch-v1", "batch-v1", None, "batch-v1"]
    assert (rep.rows, rep.calls, rep.ok, rep.failed, rep.pending) == (4, 3, 2, 1, 1)

    async def twice(cache: JudgmentCache) -> pa.Table:
        first = await alabel_table(table, judge, cache=cache)
        return await alabel_table(first, judge, cache=cache, rerun_failed=True)

    with JudgmentCache(tmp_path / "cache.jsonl") as cache:
        again = asyncio.run(twice(cache))
    assert judge.asked == [3, 3, 2]  # the second pass asks only failed + pending
    assert again.column("judge_status").to_pylist() == ["ok", "failed", "pending", "ok"]
