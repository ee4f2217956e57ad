"""pytest-saliency: audit saliency methods with output-sensitivity and randomization checks.

Public API: :func:`explain`, :func:`methods`, :func:`output_sensitivity`,
:func:`parameter_randomization`, :func:`similarity`.
"""

from .errors import SaliencyError, UnsupportedActivationError
from .explain import explain
from .methods.registry import methods

__all__ = ["SaliencyError", "UnsupportedActivationError", "explain", "methods"]
__version__ = "0.1.0"
