"""Error hierarchy: one root, one subclass per stage.

Every message names the file, flag, tensor or node at fault and says how to fix it.
"""

from __future__ import annotations


class DqcError(Exception):
    """Root of every error dqc raises on purpose."""


class ConfigError(DqcError, ValueError):
    """A command-line flag or config field has an unsupported value."""


class ModelLoadError(DqcError):
    """A model directory or scheduler config cannot be loaded."""


class CalibrationError(DqcError):
    """Calibration failed or a calibration result file is invalid."""


class ExportError(DqcError):
    """The ONNX export or a graph pass failed."""


class BundleError(DqcError):
    """A bundle is missing, tampered with or malformed."""


class EngineError(DqcError):
    """An engine (ONNX Runtime session, TensorRT plan) that cannot be built or run; names its file."""


class EngineInputError(DqcError, ValueError):
    """An engine was called with an input of the wrong name, shape, dtype or range."""


class SamplerError(DqcError, ValueError):
    """A sampler was asked for something it cannot do."""
