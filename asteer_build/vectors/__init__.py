"""Steering vectors: contrast banks (`banks`: types, request plan, cache; `writers`:
templates, an OpenAI-compatible endpoint, the local vLLM engine), pooling (`pooling`: the
vLLM engine, the HF reference), the methods (`methods`: one DiffMean, one LinearProbe),
the settings (`settings`: the config's `vectors:` section) and the stage (`stage`).
"""

from __future__ import annotations

from .banks import (
    SEED_INSTRUCTIONS,
    Bank,
    BankError,
    BankRequest,
    bank_path,
    build_banks,
    check_bank,
    load_bank,
    plan_requests,
)
from .methods import diffmean, train_probe
from .settings import METHODS, POOLS, ProbeSettings, VectorSettings
from .stage import build_vectors, compute_vectors, load_vectors, stage_banks
from .writers import EndpointWriter, EngineWriter, TemplateWriter, bank_messages, parse_response

__all__ = [
    "METHODS", "POOLS", "SEED_INSTRUCTIONS", "Bank", "BankError", "BankRequest",
    "EndpointWriter", "EngineWriter", "ProbeSettings", "TemplateWriter", "VectorSettings",
    "bank_messages", "bank_path", "build_banks", "build_vectors", "check_bank",
    "compute_vectors", "diffmean", "load_bank", "load_vectors", "parse_response",
    "plan_requests", "stage_banks", "train_probe",
]
