"""Run ZeroMQ PUSH/PULL pipelines under supervision."""

from .runtime import RunAborted
from .stagefn import StageContext

__version__ = "0.1.0"
__all__ = ["RunAborted", "StageContext", "__version__"]
