"""pytest-saliency: audit saliency methods with output-sensitivity and randomization checks.

Public API: :func:`explain`, :func:`methods`, :func:`checks`, the checks
(:func:`output_sensitivity`, :func:`parameter_randomization`, :func:`smooth_randomization`,
:func:`efficient_randomization`, :func:`data_randomization`), :func:`similarity`.

Everything is imported lazily, so that installing the pytest plugin does not make every pytest
run import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "explain": ".explainer",
    "methods": ".bundled.registry",
    "similarity": ".similarities",
    "metrics": ".similarities",
    "output_sensitivity": ".checks",
    "parameter_randomization": ".checks",
    "smooth_randomization": ".checks",
    "efficient_randomization": ".checks",
    "data_randomization": ".checks",
    "AuditResult": ".checks",
    "SensitivityResult": ".checks",
    "RandomizationResult": ".checks",
    "ComplexityResult": ".checks",
    "DataRandomizationResult": ".checks",
    "sample": ".data",
    "ClassLogit": ".engine.targets",
    "Binary": ".engine.targets",
    "MultiLabel": ".engine.targets",
    "Segmentation": ".engine.targets",
    "Regression": ".engine.targets",
    "Target": ".engine.targets",
    "SaliencyError": ".errors",
    "UnsupportedActivationError": ".errors",
    "NonFiniteError": ".errors",
    "ModelError": ".errors",
    "SaliencyWarning": ".errors",
}

__all__ = sorted([*_EXPORTS, "checks"])

if TYPE_CHECKING:  # pragma: no cover
    from .bundled.registry import methods  # noqa: F401
    from .checks import (  # noqa: F401
        AuditResult,
        ComplexityResult,
        DataRandomizationResult,
        RandomizationResult,
        SensitivityResult,
        data_randomization,
        efficient_randomization,
        output_sensitivity,
        parameter_randomization,
        smooth_randomization,
    )
    from .data import sample  # noqa: F401
    from .engine.targets import (  # noqa: F401
        Binary,
        ClassLogit,
        MultiLabel,
        Regression,
        Segmentation,
        Target,
    )
    from .errors import (  # noqa: F401
        ModelError,
        NonFiniteError,
        SaliencyError,
        SaliencyWarning,
        UnsupportedActivationError,
    )
    from .explainer import explain  # noqa: F401
    from .similarities import metrics, similarity  # noqa: F401


def __getattr__(name: str) -> Any:
    if name == "checks":
        # The subpackage is callable: ``ps.checks()`` lists the registered checks.
        return importlib.import_module(".checks", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pytest_saliency' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
