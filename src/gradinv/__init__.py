"""gradinv: gradient inversion attacks and defenses for federated learning.

``Scenario -> observe() -> Observation -> Attack.reconstruct() -> Reconstruction -> score_images()``
"""

from gradinv import analysis, defense_bench, defenses
from gradinv.attacks import ATTACKS, Attack, build_attack
from gradinv.attacks.labels import LABEL_METHODS, recover_labels
from gradinv.data import ImageDataset, Normalization, load_dataset, sample_batch
from gradinv.defenses import DEFENSES, Defense, build_defense, dp_epsilon, parse_defense
from gradinv.errors import GradinvError
from gradinv.fl import FedAvg, FedSGD, Scenario
from gradinv.metrics import label_accuracy, label_count_accuracy, label_existence_accuracy, score_images
from gradinv.models import build_model, list_models
from gradinv.types import GroundTruth, Knowledge, Observation, Reconstruction, ThreatModel

__version__ = "0.1.0"

__all__ = [
    "analysis",
    "defense_bench",
    "defenses",
    "ATTACKS",
    "DEFENSES",
    "LABEL_METHODS",
    "Attack",
    "Defense",
    "FedAvg",
    "FedSGD",
    "GradinvError",
    "GroundTruth",
    "ImageDataset",
    "Knowledge",
    "Normalization",
    "Observation",
    "Reconstruction",
    "Scenario",
    "ThreatModel",
    "build_attack",
    "build_defense",
    "dp_epsilon",
    "build_model",
    "label_accuracy",
    "label_count_accuracy",
    "label_existence_accuracy",
    "list_models",
    "load_dataset",
    "parse_defense",
    "recover_labels",
    "sample_batch",
    "score_images",
]
