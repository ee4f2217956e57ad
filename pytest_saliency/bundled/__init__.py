"""Bundled saliency methods; each module registers its methods on import.

The package is not called ``methods`` so that importing it cannot hide the public
``pytest_saliency.methods()`` function.
"""
