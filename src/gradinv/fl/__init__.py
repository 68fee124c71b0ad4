"""Federated-learning side: protocols, scenarios, the server's observation."""

from gradinv.fl.protocols import FedAvg, FedSGD, client_update, cross_entropy
from gradinv.fl.scenario import Scenario, observation_from_files

__all__ = ["FedAvg", "FedSGD", "Scenario", "client_update", "cross_entropy", "observation_from_files"]
