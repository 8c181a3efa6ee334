"""The few exception types that the command line turns into one clear message and a non-zero exit."""

from __future__ import annotations


class RadPretrainError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class ConfigError(RadPretrainError):
    """A config file or override is unknown, mistyped or inconsistent."""


class DicomError(RadPretrainError):
    """A DICOM file cannot be used; the message never contains header values."""


class ShardError(RadPretrainError):
    """Shards are missing, truncated or do not match what was asked for."""


class CohortError(RadPretrainError):
    """A labeled cohort is missing, inconsistent or too small for what was asked."""


class NonFiniteLossError(RadPretrainError):
    """A loss became NaN or infinite; names the step and the loss terms."""

    def __init__(self, step: int, terms: dict[str, float]) -> None:
        shown = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
        super().__init__(
            f"non-finite loss at step {step} ({shown}); lower the learning rate, enable gradient "
            "clipping or check the input data, then resume from the last checkpoint"
        )
        self.step = step
        self.terms = terms
