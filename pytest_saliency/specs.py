"""Method specs: how a user names a method with its options, parsed and given an id in one place.

A spec is a registered method's name (``"gradcam"``) or a mapping ``{"name": ..., "id": ...,
"layer": ..., **options}``. The API, the fixture's ``saliency_method`` parameters and the
suites all read specs with :func:`parse_method` and name them with :func:`method_id`.
No torch import here: the plugin reads ids at collection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SaliencyError


@dataclass
class MethodSpec:
    """One method to run: its name, its own options, its CAM layer (None: the default) and
    the id the user gave (None: made by :func:`method_id`)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    layer: Any = None
    id: str | None = None


def parse_method(spec: object) -> MethodSpec:
    """A :class:`MethodSpec` from a name, a mapping or a MethodSpec; an error naming the
    accepted forms otherwise (options are validated against the method by its ``bind``)."""
    if isinstance(spec, MethodSpec):
        return spec
    if isinstance(spec, str):
        return MethodSpec(spec)
    if isinstance(spec, Mapping):
        name = spec.get("name")
        if not isinstance(name, str):
            raise SaliencyError(
                f"a method is a name or a mapping {{'name': ..., **options}}; this mapping has "
                f"no method name under 'name': {dict(spec)!r}"
            )
        options = {k: v for k, v in spec.items() if k not in ("name", "id", "layer")}
        given = spec.get("id")
        text = None if given is None else str(given)
        if text is not None and (not text.strip() or not text.isprintable() or "::" in text):
            raise SaliencyError(
                f"method {name!r}: id {text!r} is not one printable line without '::'; an id "
                "names test items and report rows, so give a non-empty id without newlines, "
                "control characters or '::', or leave 'id' out for the made one"
            )
        return MethodSpec(name, options, spec.get("layer"), None if given is None else str(given))
    raise SaliencyError(
        f"a method is a name or a mapping {{'name': ..., **options}}, got {type(spec).__name__}"
    )


def id_value(value: object) -> str:
    """An option value as it reads in an id (YAML spelling for booleans)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def method_id(spec: object, *, validate: bool = False) -> str:
    """The readable id of a method: its ``id``, else its name plus its non-default options
    (``gradcam++-positive=false``); the CAM layer is where a method reads, not an option, and
    stays out of it (two entries differing only by layer need an explicit ``id``).

    ``validate=True`` also checks the method's options (an error naming the valid ones).
    """
    from .bundled.registry import get_method

    parsed = parse_method(spec)
    method = get_method(parsed.name)
    if validate:
        method.bind(parsed.options)
    if parsed.id is not None:
        return parsed.id
    extra = [
        f"{key}={id_value(value)}"
        for key, value in parsed.options.items()
        if key not in method.defaults or method.defaults[key] != value
    ]
    return "-".join([parsed.name, *extra])
