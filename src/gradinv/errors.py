"""One error hierarchy for gradinv.

Every error a user can cause derives from :class:`GradinvError`. Its message says what is wrong and how to
fix it; the CLI prints it on one line and exits with code 2.
"""

from __future__ import annotations


class GradinvError(Exception):
    """Base class of every error gradinv raises on purpose."""


class ConfigError(GradinvError, ValueError):
    """An option, name or combination of settings is invalid (unknown model, bad batch size...)."""


class DataError(GradinvError, ValueError):
    """Input data cannot be loaded or does not fit (missing path, empty folder, bad ``.npz``...)."""


class ShapeError(GradinvError, ValueError):
    """A tensor or image size does not fit the model (image too small for the architecture...)."""


class UpdateFileError(GradinvError, ValueError):
    """A saved model or captured update is corrupt or does not match the model's parameters."""


class MissingKnowledgeError(GradinvError, ValueError):
    """An attack needs knowledge that the observation's threat model does not give."""


class AttackError(GradinvError, RuntimeError):
    """An attack's assumptions do not hold for this observation (e.g. no bias in the layer)."""
