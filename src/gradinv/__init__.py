"""gradinv: gradient inversion attacks and defenses for federated learning.

``Scenario -> observe() -> Observation -> Attack.reconstruct() -> Reconstruction -> score_images()``

Names are imported on first use (PEP 562), so ``import gradinv`` and ``gradinv --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "ATTACKS": "gradinv.attacks",
    "Attack": "gradinv.attacks",
    "build_attack": "gradinv.attacks",
    "LABEL_METHODS": "gradinv.attacks.labels",
    "recover_labels": "gradinv.attacks.labels",
    "ImageDataset": "gradinv.data",
    "Normalization": "gradinv.data",
    "load_dataset": "gradinv.data",
    "load_text": "gradinv.data",
    "sample_batch": "gradinv.data",
    "DEFENSES": "gradinv.defenses",
    "Defense": "gradinv.defenses",
    "build_defense": "gradinv.defenses",
    "dp_epsilon": "gradinv.defenses",
    "parse_defense": "gradinv.defenses",
    "GradinvError": "gradinv.errors",
    "FedAvg": "gradinv.fl",
    "FedSGD": "gradinv.fl",
    "Scenario": "gradinv.fl",
    "label_accuracy": "gradinv.metrics",
    "label_count_accuracy": "gradinv.metrics",
    "label_existence_accuracy": "gradinv.metrics",
    "score_images": "gradinv.metrics",
    "score_text": "gradinv.metrics",
    "build_model": "gradinv.models",
    "build_text_model": "gradinv.models",
    "list_models": "gradinv.models",
    "GroundTruth": "gradinv.types",
    "Knowledge": "gradinv.types",
    "Observation": "gradinv.types",
    "Reconstruction": "gradinv.types",
    "ThreatModel": "gradinv.types",
    "Case": "gradinv.experiments",
    "Cell": "gradinv.experiments",
    "Seeds": "gradinv.experiments",
    "run_cell": "gradinv.experiments",
}
_SUBMODULES = ("analysis", "attacks", "data", "defenses", "experiments", "fl", "metrics", "models", "types")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"gradinv.{name}")
    else:
        raise AttributeError(f"module 'gradinv' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
