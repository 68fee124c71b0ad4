"""Federated-learning side: protocols, scenarios, the server's observation."""

from gradinv.fl.client import STAGES, ClientBatch, ClientState
from gradinv.fl.protocols import FedAvg, FedSGD, client_update, cross_entropy, protocol_from_dict
from gradinv.fl.scenario import Scenario, observation_from_files
from gradinv.fl.vertical import FeatureSplit, VerticalFL, VerticalObservation, VerticalScenario

__all__ = [
    "STAGES",
    "ClientBatch",
    "ClientState",
    "FeatureSplit",
    "FedAvg",
    "FedSGD",
    "Scenario",
    "VerticalFL",
    "VerticalObservation",
    "VerticalScenario",
    "client_update",
    "cross_entropy",
    "observation_from_files",
    "protocol_from_dict",
]
