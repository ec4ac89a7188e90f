"""Facts about the authors' release that the importer and its dataset card both state:
where it lives, the paper, their judge, their prompt draw, how their failures look, and
the imported rollouts' schema. A module of its own so the card does not import the
importer (nor the importer the card's internals)."""

from __future__ import annotations

import pyarrow as pa

from ...core import contract

AUTHORS_REPO = "Fcr09/SteerBoost-data"
AUTHORS_CODE = "https://github.com/Fcr09/SteerBoost"
PAPER = ("*When is Your LLM Steerable?* (Fan, Cheng, Li, Feizi, Zhou, 2026), the ASTEER "
         "testbed")
#: the model their `submit_gpt_judgment.py` calls (their README says GPT-5-nano)
JUDGE_MODEL = "gpt-5-mini"
#: our name for their rubric (`submit_gpt_judgment.py`), in `judge_rubric`
JUDGE_RUBRIC = "steerboost-authors"
#: concept levels are id ranges in their `xgb/concept_partition.py`
LEVELS = contract.AUTHORS_LEVEL_RANGES
#: their prompts: `random.seed(42); random.sample(alpaca_eval, 50)` (`utils.py`)
N_PROMPTS = 50
PROMPT_SEED = 42
#: the explanation texts `process_judgment_results.py` writes next to a failure-as-0
FAILURE_PREFIXES = ("Evaluation error in batch processing", "Evaluation error parsing response")
#: per-item token counts, if a result file carries one (their release does not)
TOKEN_KEYS = ("response_tokens", "num_tokens", "n_tokens")
JUDGMENT_CACHE_VERSION = 1
#: their model folder -> tokenizer (their `utils.JUDGMENT_CACHE_LLM_TO_TOKENIZER`), for
#: `--tokenizer auto`
AUTHORS_TOKENIZERS = {
    "Qwen3-4B": "Qwen/Qwen3-4B",
    "Qwen3-8B": "Qwen/Qwen3-8B",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "Qwen3-1.7B": "Qwen/Qwen3-1.7B",
    "Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B-Instruct",
}
#: the label as the authors stored it (0 for their failed judgments), next to ours
AUTHORS_LABEL_FIELD = pa.field("authors_label", pa.int8())
IMPORT_SCHEMA = pa.schema([*contract.ROLLOUTS_SCHEMA, AUTHORS_LABEL_FIELD])
