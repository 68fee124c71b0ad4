"""gradinv: gradient inversion attacks and defenses for federated learning."""

__version__ = "0.1.0"
