"""Typed errors. Every error a user can cause names the culprit: a file, an image index, a marker
count, a provider. Library tracebacks from deep inside torch/onnxruntime/PIL are caught at the
boundary and re-raised as one of these."""

from __future__ import annotations


class EdgeLMMError(Exception):
    """Base class of every error edgelmm raises on purpose."""


class CheckpointError(EdgeLMMError):
    """A model directory is missing files, has an unreadable config, or is not a supported model."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's model type is not one of the supported families."""


class ImageError(EdgeLMMError):
    """An image could not be read or used. Carries the image's position in the request (`index`,
    0-based as in the Python list) and its source when known; the message numbers images from 1,
    as prompts do ("image 2" is the second <image>)."""

    def __init__(self, message: str, *, index: int | None = None, source: str | None = None):
        where = []
        if index is not None:
            where.append(f"image {index + 1}")
        if source is not None:
            where.append(repr(source))
        prefix = f"{' '.join(where)}: " if where else ""
        super().__init__(prefix + message)
        self.index = index
        self.source = source


class PromptError(EdgeLMMError):
    """The prompt does not fit the images or the model (marker count, context window, template)."""


class BundleError(EdgeLMMError):
    """A bundle directory is incomplete, corrupt or of an unknown version. Names the file."""

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class BackendUnavailable(EdgeLMMError):
    """The requested backend or provider cannot run on this machine; says what to install."""


class ExportError(EdgeLMMError):
    """An exporter could not turn the model into the requested format."""


class GGUFError(BundleError):
    """A GGUF file is malformed (magic, version, truncation) or its tensors do not match its own
    metadata. Raised before llama.cpp sees the file, so bad input never aborts inside C code."""


class CalibrationError(EdgeLMMError):
    """Calibration cannot run: the sample source is missing, unreadable, or yields no usable record,
    or the bundle lacks the fp32 graphs that quantization starts from."""


class QualityGateError(ExportError):
    """A quantized precision broke the model beyond the gate (held-out accuracy drop, vision feature
    cosine). Carries the quality report; nothing was written to the bundle."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class SourceError(EdgeLMMError):
    """A video source cannot be opened or was lost: a missing file, a URL or camera that does not
    answer (after the reconnect attempts), an OpenCV build without the needed backend. Names it."""

    def __init__(self, message: str, *, source: str | None = None):
        super().__init__(f"{source}: {message}" if source else message)
        self.source = source


class OptionError(EdgeLMMError, ValueError):
    """An option is out of its range (a watch or video setting); names the option. A ValueError
    too, so code that caught ValueError keeps working."""


class CalibrationOptionError(OptionError, CalibrationError):
    """A calibration option is out of its range or names an unknown method; names the option. A
    CalibrationError too, which is what calibrate() raised for these before they were checked up front."""


class MemoryBudgetError(EdgeLMMError):
    """A step needs more memory than the budget (--max-memory, default what the machine has free).
    Raised before the step starts; names the step, the estimate, the budget and what would fit."""
