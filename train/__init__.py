"""asteer's training package: the steerability predictor and strength search.

Reads a published ASTEER dataset (local folder or Hub id), trains one LightGBM
predictor per (model, method) on leakage-free splits, evaluates it against majority
and alpha-only baselines, and measures predictor-guided strength search against grid
search baselines in decoded tokens. CLI: ``asteer-train fit|evaluate|search|suggest|all``;
library entry point for pipelines: ``train.run.run_all``.

Module map: data (loading), splits, feature_names (feature selection over the naming
scheme of the dataset contract, `asteer_build.core.contract`), model (predictor, search over
hyperparameters, save/load), metrics, evaluate, search (all strength-search strategies
and the cost model), plots, suggest (online use; the only place that touches the
builder's engine, lazily), run (stages), synthetic (schema-exact synthetic data for
tests and benchmarks), cli.

Imports neither vLLM nor Ray nor torch at import time; of asteer_build only the light
dataset contract (`asteer_build.core.contract`: schemas, feature names, concept partition).
"""
