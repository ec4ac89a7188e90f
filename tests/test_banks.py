"""Contrast banks: the request plan, the per-concept cache and its resume, and the
OpenAI-compatible writer against the session's real `vllm serve` of the tiny model, which
goes away mid-run (through a fault proxy) and comes back."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from asteer_build.inputs.sources import Concept, tiny_concepts
from asteer_build.vectors import (
    SEED_INSTRUCTIONS,
    BankError,
    EndpointWriter,
    TemplateWriter,
    bank_path,
    build_banks,
    check_bank,
    load_bank,
    parse_response,
    plan_requests,
)

from .judge_support import KEY_ENV, FaultProxy

N = 6


def test_seed_instructions_and_plan():
    assert len(SEED_INSTRUCTIONS) == 7
    flat = [q for g in SEED_INSTRUCTIONS.values() for q in g]
    assert len(flat) >= 20 and len(set(flat)) == len(flat)
    c = Concept("k1", "the ocean")
    reqs = plan_requests(c, 50, seed=0)
    pos = [r for r in reqs if r.kind == "pos"]
    neg = [r for r in reqs if r.kind == "neg"]
    assert len(pos) == len(neg) == 50
    # positives and negatives never share an instruction; both sides use several
    assert not {r.instruction for r in pos} & {r.instruction for r in neg}
    assert len({r.instruction for r in pos}) >= 10 and len({r.instruction for r in neg}) >= 10
    assert len({r.seed for r in reqs}) == 100
    assert plan_requests(c, 50, seed=0) == reqs  # stable: a resumed run asks the same
    assert plan_requests(c, 50, seed=1) != reqs


def test_template_bank_contrasts_the_concept(tmp_path):
    cs = tiny_concepts()[:3]
    banks = build_banks(cs, TemplateWriter(), tmp_path, n=N)
    for c in cs:
        b = banks[c.concept_id]
        assert len(b.positives) == len(b.negatives) == N
        assert all(c.concept in t.split() for t in b.positives)
        assert not any(c.concept in t.split() for t in b.negatives)
        assert b.header["writer"] == "template" and b.header["model"] == "tinyworld-templates"
        assert load_bank(bank_path(tmp_path, c.concept_id)).positives == b.positives
    again = build_banks(cs, TemplateWriter(), tmp_path / "other", n=N)
    assert all(again[c.concept_id].digest() == banks[c.concept_id].digest() for c in cs)


class _Boom(Exception):
    pass


class _FlakyWriter(TemplateWriter):
    """Dies after `fail_after` texts, like a process killed mid-concept."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.fail_after = fail_after

    def write(self, concept, reqs):
        for item in super().write(concept, reqs):
            if self.fail_after is not None and self.calls > self.fail_after:
                raise _Boom("killed")
            yield item


def test_interrupted_banks_resume_without_redoing_work(tmp_path):
    cs = tiny_concepts()[:4]
    full = build_banks(cs, TemplateWriter(), tmp_path / "ref", n=N)
    # 1) stopped between concepts: two concepts committed
    done: list[str] = []

    def stop_after_two(cid, bank):
        done.append(cid)
        if len(done) == 2:
            raise _Boom("stop")

    w = TemplateWriter()
    with pytest.raises(_Boom):
        build_banks(cs, w, tmp_path / "a", n=N, on_concept=stop_after_two)
    assert w.calls == 2 * 2 * N
    w2 = TemplateWriter()
    got = build_banks(cs, w2, tmp_path / "a", n=N)
    assert w2.calls == 2 * 2 * N  # only the two unfinished concepts
    assert {k: b.digest() for k, b in got.items()} == {k: b.digest() for k, b in full.items()}
    # 2) killed inside a concept: its finished texts survive, a torn line is dropped
    w3 = _FlakyWriter(fail_after=2 * N + 3)
    with pytest.raises(_Boom):
        build_banks(cs, w3, tmp_path / "b", n=N)
    part = tmp_path / "b" / f"{cs[1].concept_id}.partial.jsonl"
    with open(part, "a") as f:
        f.write('{"kind": "pos", "index": 5, "instr')  # torn write
    w4 = TemplateWriter()
    got = build_banks(cs, w4, tmp_path / "b", n=N)
    assert w4.calls == 4 * 2 * N - (2 * N + 3)
    assert not part.exists()
    assert {k: b.digest() for k, b in got.items()} == {k: b.digest() for k, b in full.items()}
    # a cache written with other settings is refused, not mixed
    with pytest.raises(BankError, match="different settings"):
        build_banks(cs, TemplateWriter(), tmp_path / "b", n=N + 1)


def test_bad_banks_fail_clearly(tmp_path):
    with pytest.raises(BankError, match="k1: contrast bank has no positives"):
        check_bank("k1", [], ["a text"])
    with pytest.raises(BankError, match="no negatives"):
        check_bank("k1", ["a text"], [])
    with pytest.raises(BankError, match="duplicate concept ids"):
        build_banks([Concept("a", "ocean"), Concept("a", "music")], TemplateWriter(), tmp_path)
    with pytest.raises(BankError, match="empty concept name"):
        build_banks([Concept("a", " ")], TemplateWriter(), tmp_path)
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"header": {"concept_id": "x"}}) + "\n" + json.dumps(
        {"kind": "neg", "index": 0, "text": "hello"}) + "\n")
    with pytest.raises(BankError, match="x: contrast bank has no positives"):
        load_bank(p)


def test_parse_response_tolerates_truncation_and_plain_text():
    assert parse_response('{"response":"a \\"b\\" c"}') == 'a "b" c'
    assert parse_response('{"response":"cut off here') == "cut off here"
    assert parse_response("plain answer") == "plain answer"
    assert parse_response('{"other": 1}') == "" and parse_response(None) == ""


# -- the endpoint writer against a real server ------------------------------------------


def _lines(cache: Path) -> int:
    return sum(len(p.read_text().splitlines()) - 1 for p in cache.glob("*.jsonl"))


def test_endpoint_writer_survives_server_kill_and_restart(judge_server, tmp_path):
    """The session's `vllm serve` (conftest.judge_server) goes away mid-run and comes
    back: the fault proxy in front of it drops every connection for a while (the server
    is shared, so it is not killed); the run waits, retries and finishes every text."""
    from judge.pool import EndpointConfig, RetryPolicy

    proxy = FaultProxy(judge_server["url"])
    try:
        cs = tiny_concepts()[:3]
        cache = tmp_path / "banks"
        retry = RetryPolicy(max_attempts=400, base_delay_s=0.2, max_delay_s=1.0,
                            timeout_s=30.0, failures_to_eject=3, cooldown_s=0.5,
                            max_cooldown_s=1.0, acquire_timeout_s=300.0)
        endpoint = EndpointConfig(proxy.url, api_key_env=KEY_ENV, max_concurrency=4)
        writer = EndpointWriter([endpoint], judge_server["model"], max_tokens=48,
                                max_chars=160, retry=retry)
        result: dict = {}

        def run() -> None:
            try:
                result["banks"] = build_banks(cs, writer, cache, n=N)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                result["error"] = e

        th = threading.Thread(target=run)
        th.start()
        deadline = time.monotonic() + 120
        while _lines(cache) < 2 * N + 2 if cache.exists() else True:
            assert time.monotonic() < deadline and th.is_alive(), result
            time.sleep(0.05)
        proxy.reset(lambda key, attempt, body: "drop")  # the server is gone
        written_at_kill = _lines(cache)
        time.sleep(1.0)
        assert th.is_alive(), result  # the run waits for the server, it does not fail
        assert proxy.injected["drop"] >= 1  # requests met the outage
        proxy.reset()  # ...and it is back
        th.join(300)
        assert not th.is_alive() and "error" not in result, result
        banks = result["banks"]
        assert written_at_kill < 3 * 2 * N  # the kill really fell mid-run
        for c in cs:
            b = banks[c.concept_id]
            assert len(b.positives) == len(b.negatives) == N
            assert all(t.strip() for t in b.positives + b.negatives)
            recs = [json.loads(x) for x in bank_path(cache, c.concept_id).read_text()
                    .splitlines()[1:]]
            keys = [(r["kind"], r["index"]) for r in recs]
            assert sorted(keys) == sorted({(k, i) for k in ("pos", "neg") for i in range(N)})
            assert b.header["writer"] == "endpoint"
            assert b.header["model"] == judge_server["model"]
            assert b.header["temperature"] == 0.8 and "incorporate" in (
                b.header["prompt"]["positive"])
        assert writer.pool is None  # closed
        # the kill cost retries, not texts: requests failed and were retried
        assert writer.last_stats[0]["errors"] >= 1, writer.last_stats
        print(f"written at kill {written_at_kill}/36, calls {writer.calls}, "
              f"pool {writer.last_stats}")
        stats_ok = writer.calls
        assert stats_ok >= 3 * 2 * N
        # a rerun finds every bank cached and asks the server nothing
        w2 = EndpointWriter([EndpointConfig(proxy.url, api_key_env=KEY_ENV)],
                            judge_server["model"], max_tokens=48, max_chars=160, retry=retry)
        again = build_banks(cs, w2, cache, n=N)
        assert w2.calls == 0
        assert {k: b.digest() for k, b in again.items()} == {
            k: b.digest() for k, b in banks.items()}
    finally:
        proxy.release_held()
        proxy.close()
