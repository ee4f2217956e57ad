"""The two audits of a saliency method and their results.

:func:`output_sensitivity` explains two classes for each input and compares the maps;
:func:`parameter_randomization` explains a trained model and its randomized copies and compares
the maps. A faithful method gives dissimilar maps in both (Adebayo et al. 2018; Khakzar et al.
2020).
"""

from .randomization import parameter_randomization
from .results import AuditResult, RandomizationResult, SensitivityResult
from .sensitivity import output_sensitivity

__all__ = [
    "AuditResult",
    "RandomizationResult",
    "SensitivityResult",
    "output_sensitivity",
    "parameter_randomization",
]
