"""The checks of a saliency method, their registry and their results.

Each check is one :class:`~pytest_saliency.checks.base.Check` definition (see ``base``):
:func:`output_sensitivity` explains two classes for each input and compares the maps;
:func:`parameter_randomization` and :func:`smooth_randomization` compare the maps of a trained
model with those of randomized copies; :func:`efficient_randomization` measures the rise in
map complexity from the trained to the fully randomized model; :func:`data_randomization`
compares with a twin trained on permuted labels. A faithful method changes its maps in all
of them (Adebayo et al. 2018; Khakzar et al. 2020; Hedström et al. 2024).
"""

import sys
import types

from .base import Check, Option, Threshold, checks, get_check
from .data import data_randomization
from .efficient import efficient_randomization
from .randomization import parameter_randomization, smooth_randomization
from .results import (
    AuditResult,
    ComplexityResult,
    DataRandomizationResult,
    RandomizationResult,
    SensitivityResult,
)
from .sensitivity import output_sensitivity

__all__ = [
    "AuditResult",
    "Check",
    "ComplexityResult",
    "DataRandomizationResult",
    "Option",
    "RandomizationResult",
    "SensitivityResult",
    "Threshold",
    "checks",
    "data_randomization",
    "efficient_randomization",
    "get_check",
    "output_sensitivity",
    "parameter_randomization",
    "smooth_randomization",
]


class _Checks(types.ModuleType):
    """``pytest_saliency.checks`` is also the function listing the checks: ``ps.checks()``."""

    def __call__(self) -> list[str]:
        return checks()


sys.modules[__name__].__class__ = _Checks
