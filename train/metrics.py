"""Classification metrics in plain numpy (no scikit-learn dependency for three classes)."""

from __future__ import annotations

import numpy as np

from train.data import CLASS_NAMES

N_CLASSES = 3


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    m = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return classification_report(y_true, y_pred)["macro_f1"]


def classification_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Macro-F1 over the three classes (a class absent from both truth and prediction
    scores F1 = 0, as in scikit-learn's default with all labels given), accuracy,
    per-class P/R/F1, counts and the row-normalized confusion matrix."""
    m = confusion(y_true, y_pred)
    tp = np.diag(m).astype(float)
    pred_n = m.sum(axis=0).astype(float)
    true_n = m.sum(axis=1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred_n > 0, tp / pred_n, 0.0)
        recall = np.where(true_n > 0, tp / true_n, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        norm = np.where(true_n[:, None] > 0, m / true_n[:, None], 0.0)
    total = m.sum()
    return {
        "n": int(total),
        "macro_f1": float(f1.mean()),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "per_class": {
            CLASS_NAMES[c]: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(true_n[c]),
            }
            for c in range(N_CLASSES)
        },
        "confusion": m.tolist(),
        "confusion_normalized": norm.tolist(),
    }
