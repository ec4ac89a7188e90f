"""The judge pool: label every rollout, lose none, fabricate none. No vLLM import here.

Labelled shards carry the `rollouts` judge columns of the dataset contract (`label` int8
null unless ok, `judge_model`, `judge_status` ok|failed|pending, `judge_explanation`)
plus `judge_error`, the redacted reason a row failed: without it a failed row could not
be told from one that was never tried, and `--rerun-failed` would have nothing to show;
and `judge_rubric`, the version of the rubric (or rules) behind each ok or failed row.

Modules: `rubric` (prompt, schema, parsing), `pool` (endpoints, dispatch, retries),
`judges` (LLM and rules judges), `rules` (tiny-world measures), `cache`, `label`
(label a table: the one labelling path), `shards` (shard directories on top of it),
`batchfile` (OpenAI Batch API files), `batches` (the Batch API stage: submit, poll,
collect, resubmit), `kinds` (judge.kind -> the judge and its lifetime, for the build
and the CLI), `estimate` (token counts for estimates), `agreement` (kappa,
review samples), `config`,
`secrets` (key redaction), `cli` (`asteer-judge`).
"""

from judge.rubric import RUBRIC_VERSION

__all__ = ["RUBRIC_VERSION"]
