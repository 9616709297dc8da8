"""edgelmm: run multi-image vision-language models on edge devices."""

from .api import info, load
from .errors import (BackendUnavailable, BundleError, CheckpointError, EdgeLMMError, ExportError, ImageError,
                     PromptError, UnsupportedModelError)
from .pipeline import Generation, Pipeline
from .video import Video

__version__ = "0.1.0"

__all__ = ["load", "info", "Pipeline", "Generation", "Video", "EdgeLMMError", "CheckpointError", "UnsupportedModelError",
           "ImageError", "PromptError", "BundleError", "BackendUnavailable", "ExportError", "__version__"]
