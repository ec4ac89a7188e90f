"""asteer's training package: the steerability predictor and strength search.

Reads a published ASTEER dataset (local folder or Hub id), trains one LightGBM
predictor per (model, method) on leakage-free splits, evaluates it against majority
and alpha-only baselines, and measures predictor-guided strength search against grid
search baselines in decoded tokens. CLI: ``asteer-train fit|evaluate|search|suggest|all``;
library entry point for pipelines: ``train.run.run_all``.

Module map: data (loading), splits, feature_names (the builder's naming scheme, one
parser), model (predictor, search over hyperparameters, save/load), metrics, evaluate,
search (all strength-search strategies and the cost model), plots, suggest (online
use; the only place that touches asteer_build, lazily), run (stages), synthetic
(schema-exact synthetic data for tests and benchmarks), cli.

Imports neither vLLM nor Ray nor asteer_build at import time.
"""
