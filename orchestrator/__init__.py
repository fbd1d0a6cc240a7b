"""Run ZeroMQ PUSH/PULL pipelines under supervision."""

from .stagefn import StageContext

__version__ = "0.1.0"
__all__ = ["StageContext", "__version__"]
