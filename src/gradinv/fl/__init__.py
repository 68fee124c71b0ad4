"""Federated-learning side: protocols, scenarios, the server's observation."""

from gradinv.fl.client import STAGES, ClientBatch, ClientState
from gradinv.fl.protocols import FedAvg, FedSGD, client_update, cross_entropy, protocol_from_dict
from gradinv.fl.scenario import Scenario, observation_from_files

__all__ = [
    "STAGES",
    "ClientBatch",
    "ClientState",
    "FedAvg",
    "FedSGD",
    "Scenario",
    "client_update",
    "cross_entropy",
    "observation_from_files",
    "protocol_from_dict",
]
