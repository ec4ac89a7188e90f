"""Steering vectors: contrast banks (`banks`: types, request plan, cache; `bankfiles`: the
reference authors' bank files from a Hub dataset or a folder; `writers`: templates, an
OpenAI-compatible endpoint, the local vLLM engine), pooling (`pooling`: the
vLLM engine, the HF reference), the methods (`methods`: one DiffMean, one LinearProbe),
the settings (`settings`: the config's `vectors:` section) and the stage (`stage`).
"""

from __future__ import annotations

from .bankfiles import BankFiles, load_bank_files, read_bank_file
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
    "METHODS", "POOLS", "SEED_INSTRUCTIONS", "Bank", "BankError", "BankFiles", "BankRequest",
    "EndpointWriter", "EngineWriter", "ProbeSettings", "TemplateWriter", "VectorSettings",
    "bank_messages", "bank_path", "build_banks", "build_vectors", "check_bank",
    "compute_vectors", "diffmean", "load_bank", "load_bank_files", "load_vectors",
    "parse_response", "read_bank_file",
    "plan_requests", "stage_banks", "train_probe",
]
