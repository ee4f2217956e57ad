"""Bundled saliency methods; each module registers its methods on import."""

import sys
import types


class _CallablePackage(types.ModuleType):
    """Importing this package binds ``pytest_saliency.methods`` to it, hiding the lazily exported
    ``pytest_saliency.methods()`` function; calling the package does what that function does."""

    def __call__(self) -> list[str]:
        from .registry import methods

        return methods()


sys.modules[__name__].__class__ = _CallablePackage
