"""Metrics: response distance R, the collapse definition, and (later) sample-quality scores."""

from .collapse import CollapseDetector
from .response import ResponseDistance

__all__ = ["CollapseDetector", "ResponseDistance"]
