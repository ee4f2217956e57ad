"""YAML audit suites: ``saliency_*.yaml`` / ``*.saliency.yaml`` files collected as pytest items.

Schema (keys other than these are errors)::

    model: pkg.models:net          # an nn.Module, or a zero-argument callable returning one
    inputs: pkg.data:batch         # a tensor [N, ...] (or a callable), or a .pt file (relative
                                   # to this file, loaded with weights_only=True)
    targets: null                  # same forms, or a list of ints; default: predicted classes
                                   # or a kind: {kind: segmentation, index: 3, pixels: all}
                                   # (class, binary, multilabel, segmentation, regression,
                                   # callable)
    output: null                   # the scored tensor of what the model returns: an index
                                   # (0), a key or attribute ('out'), or {call: pkg.mod:fn}
    device: auto                   # auto|cpu|cuda|cuda:N|mps; --saliency-device wins
    seed: 0                        # similarity, seed, max_similarity, min_rise, batch_size,
    similarity: ssim               # confidence: here for every check that has it, or per check
    max_similarity: 0.5            # below; ini/CLI values apply where the suite says nothing
    batch_size: null
    confidence: false              # the 95% CI must meet the threshold too
    methods:                       # a name, or {name, id, layer (CAM methods), **options}
      - gradient
      - {name: gradcam, layer: features.10}
    checks:                        # default: output_sensitivity and parameter_randomization
      output_sensitivity: {against: random}
      parameter_randomization: {mode: cascading, order: top_down, layers: blocks}
      smooth_randomization: {noise_samples: 50, noise_magnitude: 0.1}
      efficient_randomization: {bins: 100, min_rise: 0.1}
      data_randomization: {model: pkg.models:permuted_net}   # the permuted-label twin
                                   # any check: methods: [ids] runs it for those methods only
    expect:                        # by method id: an outcome for every check it runs, or
      guided_backprop: fail        # {check: outcome}; strict: xfailed while failing, a
      gradcam: {output_sensitivity: unsupported}  # failure once it passes. error,
                                   # unsupported, nonfinite: the engine refuses the audit
                                   # (that kind of refusal; error: any); xfailed while it
                                   # does, a failure once the audit runs or raises otherwise

Several models instead of ``model:``::

    models:                        # model id -> import path, or a mapping of:
      vgg11: cifar.models:vgg11
      resnet18:
        model: cifar.models:resnet18
        inputs: cifar.data:batch   # default: the top-level inputs / targets
        layer: layer4              # CAM layer of the methods that name none
        checks: {parameter_randomization: {layers: blocks}}   # over the suite's, for it
        expect: {gradcam++: fail}  # over the suite's expect, for it

One item per (method, check), ``<file>::<check>[<method id>]`` (``<file>::<model id>::<check>
[<method id>]`` with ``models:``); the id is the ``id`` key, else the name plus its
non-default options (``rectgrad-positive=false``; the layer is not part of it).

Every mistake in the file is a collection error naming the file, the line, the key path and
what was expected. Nothing is imported at collection: a model, its inputs and targets are
imported when the first of its selected items runs, once per process (with the rootdir and the
``pythonpath`` ini on ``sys.path``), so ``--co`` and ``-k`` load nothing they do not run. A bad
import path, a factory that returns no module, inputs of the wrong type or rank, and a layer
name the model does not have are then an error of each of that model's items: the message in
full for the first, pointed at for the others.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .devices import resolve_device
from .errors import SaliencyError, closest
from .specs import method_id

# The checks a suite runs when it has no ``checks:`` key.
DEFAULT_CHECKS = ("output_sensitivity", "parameter_randomization")
TOP_KEYS = (
    "model", "models", "inputs", "targets", "output", "device", "seed", "similarity",
    "max_similarity", "min_rise", "batch_size", "confidence", "methods", "checks", "expect",
)  # fmt: skip
# What one entry of ``models:`` may give (the short form is the model's import path alone).
MODEL_KEYS = ("model", "inputs", "targets", "output", "layer", "checks", "expect")
# ``targets: {kind: ...}``: each kind's keys (the first listed is required where marked).
TARGET_KEYS: dict[str, tuple[str, ...]] = {
    "class": ("index",),
    "binary": ("index", "threshold"),
    "multilabel": ("labels", "threshold"),
    "segmentation": ("index", "pixels"),
    "regression": ("unit",),
    "callable": ("function",),
}
TARGET_REQUIRED = {"segmentation": "index", "callable": "function"}
# A model id names a node of the item ids (``suite.yaml::<model>::<check>[<method>]``).
_MODEL_ID = re.compile(r"^[\w.+-]+$")
# Settings a check may override; the suite's top-level value applies otherwise (a threshold
# or a metric only to the checks that have one).
SHARED_KEYS = ("similarity", "seed", "max_similarity", "min_rise", "batch_size", "confidence")


def _registry() -> list[str]:
    from .checks.base import checks

    return checks()


def _check(name: str) -> Any:
    from .checks.base import get_check

    return get_check(name)


_SUITE_NAME = re.compile(r"^(saliency_.+|.+\.saliency)\.ya?ml$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_TENSOR_FILE = (".pt", ".pth")
KeyPath = tuple[Any, ...]


class SuiteError(Exception):
    """A mistake in a suite; the message already names the file, line and key path."""


def is_suite(path: Path) -> bool:
    """Whether pytest should collect ``path`` as an audit suite."""
    return bool(_SUITE_NAME.match(path.name))


def collect_file(parent: pytest.Collector, file_path: Path) -> SuiteFile | None:
    """``pytest_collect_file`` for suites (called by the plugin)."""
    if is_suite(file_path):
        return SuiteFile.from_parent(parent, path=file_path)
    return None


# --- YAML with line numbers -------------------------------------------------------------------


# A suite is a short hand-written file: anything far larger, deeper or more aliased is a
# mistake or an attack (a "billion laughs" alias bomb), refused before it costs memory.
MAX_SUITE_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000
_PLAIN_TAGS = {
    "map": "tag:yaml.org,2002:map",
    "seq": "tag:yaml.org,2002:seq",
}
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when installed
_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_suite(path: Path, name: str) -> str:
    """The suite's text: UTF-8 and at most :data:`MAX_SUITE_BYTES`, or a located error."""
    size = path.stat().st_size
    if size > MAX_SUITE_BYTES:
        raise SuiteError(
            f"{name}: the suite is {size} bytes; suites are limited to {MAX_SUITE_BYTES} bytes "
            "(put large data in a .pt file and name it under inputs:)"
        )
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SuiteError(
            f"{name}:{line}: the suite is not UTF-8 (byte {raw[exc.start]:#04x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None


def load_yaml(text: str, name: str) -> tuple[Any, dict[KeyPath, int]]:
    """Safe-load ``text``; also return the 1-based line of every key path (keys and list items).

    Only plain YAML is accepted: a tag on a mapping or a list (``!!python/object/apply:...``)
    is an error, as on a scalar; so are recursive aliases, nesting deeper than
    :data:`MAX_DEPTH` and more than :data:`MAX_NODES` nodes once aliases are expanded.

    libyaml parses when it is installed; a malformed file is parsed again by the pure-Python
    parser, whose messages point at the mistake more precisely."""
    try:
        return _load_yaml(text, name, _LOADER)
    except _Malformed:
        if _LOADER is yaml.SafeLoader or len(text) > 64 * 1024:
            raise
        return _load_yaml(text, name, yaml.SafeLoader)


class _Malformed(SuiteError):
    """Not YAML at all (as opposed to YAML a suite does not accept)."""


def _load_yaml(text: str, name: str, loader_type: Any) -> tuple[Any, dict[KeyPath, int]]:
    loader = None
    try:
        loader = loader_type(text)
        node = loader.get_single_node()
        lines: dict[KeyPath, int] = {}
        budget = [MAX_NODES]
        data = None if node is None else _construct(loader, node, (), lines, name, (), budget)
    except RecursionError:
        raise SuiteError(f"{name}: the suite nests too deeply (more than {MAX_DEPTH} levels "
                         "are refused)") from None  # fmt: skip
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        if "'\\t'" in what:
            what += " (YAML indents with spaces, not tabs)"
        raise _Malformed(f"{where}: malformed YAML: {what}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        raise _Malformed(f"{name}:{line}: the suite holds a control character ({char!r}), "
                         "which YAML does not allow") from None  # fmt: skip
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _Malformed(f"{name}: malformed YAML: {first}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def _construct(loader, node, path: KeyPath, lines: dict, name: str, stack: tuple = (),
               budget: list | None = None) -> Any:  # fmt: skip
    line = node.start_mark.line + 1
    lines.setdefault(path, line)
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise SuiteError(f"{name}:{line}: the suite expands to more than {MAX_NODES} "
                             "values (aliases repeated inside aliases?)")  # fmt: skip
    if id(node) in stack:
        raise SuiteError(f"{name}:{line}: {fmt_path(path)}: a recursive alias (an anchor "
                         "used inside itself)")  # fmt: skip
    if len(stack) >= MAX_DEPTH:
        raise SuiteError(f"{name}:{line}: the suite nests more than {MAX_DEPTH} levels deep")
    inner = (*stack, id(node))
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        kind = "map" if isinstance(node, yaml.MappingNode) else "seq"
        if node.tag != _PLAIN_TAGS[kind]:
            raise SuiteError(
                f"{name}:{line}: {fmt_path(path)}: YAML tag {node.tag!r} is not allowed; a "
                "suite holds plain mappings, lists and scalars"
            )
    if isinstance(node, yaml.MappingNode):
        # Merge keys (<<) by hand, not with PyYAML's flatten_mapping (unbudgeted, recursive):
        # each source is constructed like any value, earlier sources win over later ones and
        # the mapping's own keys over every source.
        merged: dict[Any, Any] = {}
        own_pairs = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                own_pairs.append((key_node, value_node))
                continue
            sources = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise SuiteError(f"{name}:{source.start_mark.line + 1}: {fmt_path(path)}: "
                                     "'<<' merges mappings (an anchor of one, or a list of "
                                     "them)")  # fmt: skip
                for k, v in _construct(loader, source, path, lines, name, inner, budget).items():
                    merged.setdefault(k, v)
        out: dict[Any, Any] = {}
        for key_node, value_node in own_pairs:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise SuiteError(f"{name}:{line}: {fmt_path(path)}: keys must be plain names")
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise SuiteError(f"{name}:{line}: {fmt_path(path)}: keys must be plain names")
            if key in out:
                raise SuiteError(f"{name}:{line}: {fmt_path((*path, key))}: duplicate key")
            lines[(*path, key)] = line
            out[key] = _construct(loader, value_node, (*path, key), lines, name, inner, budget)
        return {**merged, **out} if merged else out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, n, (*path, i), lines, name, inner, budget)
                for i, n in enumerate(node.value)]  # fmt: skip
    return loader.construct_object(node, deep=True)


def fmt_path(path: KeyPath) -> str:
    """``('methods', 1, 'layer')`` -> ``methods[1].layer``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


# --- schema -----------------------------------------------------------------------------------


@dataclass
class MethodEntry:
    """One entry of ``methods``: a registered method, its options, layer and test id."""

    name: str
    options: dict[str, Any]
    layer: str | None
    id: str
    path: KeyPath


@dataclass
class ModelSpec:
    """One model a suite audits, with its own inputs, targets, CAM layer, check settings and
    expectations (the suite's, with the model's own on top), and where each was written."""

    id: str | None  # None: the one model of a ``model:`` suite (item ids have no model part)
    model: str
    inputs: str | dict  # a source, or {data: source, samples: N, per_class: K}
    targets: str | list[int] | dict | None
    layer: str | None  # CAM layer of the methods that need one and name none
    checks: dict[str, dict[str, Any]]  # every check the suite runs: its settings for this model
    expect: dict[tuple[str, str], str]
    paths: dict[str, KeyPath]  # "model", "inputs", "targets", "layer" -> where it was written
    check_paths: dict[tuple[str, str], KeyPath] = field(default_factory=dict)  # model-level keys
    output: Any = None  # int | str | {"call": source} | None: the scored tensor

    def path(self, key: str) -> KeyPath:
        return self.paths.get(key, (key,))

    def setting_path(self, check: str, key: str) -> KeyPath:
        """Where ``key`` of ``check`` was set for this model (its own override, else the
        suite's ``checks:``)."""
        return self.check_paths.get((check, key), ("checks", check, key))

    def layer_of(self, entry: MethodEntry) -> str | None:
        """The CAM layer ``entry`` reads on this model: its own, else the model's."""
        from .bundled.registry import get_method

        if entry.layer is not None or not get_method(entry.name).needs_layer:
            return entry.layer
        return self.layer


@dataclass
class Suite:
    """A validated suite (nothing imported yet)."""

    file: Path
    label: str  # how messages name the file (its node id, relative to the rootdir)
    lines: dict[KeyPath, int]
    models: list[ModelSpec]
    top: dict[str, Any]  # device and the shared settings given at the top level
    methods: list[MethodEntry]
    checks: dict[str, dict[str, Any]]

    def where(self, path: KeyPath) -> str:
        """``file:line: key.path`` for error messages (the nearest enclosing line if needed)."""
        probe = tuple(path)
        while probe not in self.lines and probe:
            probe = probe[:-1]
        line = self.lines.get(probe, 1)  # 1: an empty file has no nodes
        loc = f"{self.label}:{line}" if line else self.label
        return f"{loc}: {fmt_path(path)}"


class _Problems:
    """Collects every mistake of a suite so the user sees them all at once."""

    def __init__(self, label: str, lines: dict[KeyPath, int]) -> None:
        self.suite = Suite(Path(label), label, lines, [], {}, [], {})
        self.messages: list[str] = []

    def add(self, path: KeyPath, message: str) -> None:
        self.messages.append(f"{self.suite.where(path)}: {message}")

    def unknown(self, path: KeyPath, kind: str, name: object, choices) -> None:
        choices = list(choices)
        near = closest(str(name), choices)
        hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else "."
        valid = ", ".join(str(c) for c in choices)
        self.add(path, f"unknown {kind} {name!r}{hint} Valid choices: {valid}")

    def raise_if_any(self) -> None:
        if self.messages:
            raise SuiteError("\n".join(self.messages))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_setting(p: _Problems, path: KeyPath, key: str, value: Any, check: Any = None) -> None:
    """Validate one shared or check-specific setting; records problems in ``p``.

    A check's own options are validated by the check's schema (the same validators as the
    API); ``check`` is None for the suite's top-level keys."""
    from .validate import SHARED

    if check is not None and key in [o.name for o in check.options]:
        try:
            check.option(key).validate(value)
        except SaliencyError as exc:
            p.add(path, str(exc))
    elif key in SHARED:
        from .validate import problem

        found = problem(key, value)
        if found is not None:
            p.add(path, found)
    elif key == "model":  # a check's second model (data randomization's twin)
        _source(p, path, value)
    elif key == "device":
        from .devices import CHOICES, valid

        if not valid(value):
            p.add(path, f"expected {CHOICES}, got {value!r}")


def _method_entry(p: _Problems, index: int, entry: Any) -> MethodEntry | None:
    from .bundled.registry import get_method, methods

    path: KeyPath = ("methods", index)
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        p.add(path, f"expected a method name or a mapping with 'name', got {entry!r}")
        return None
    name = entry.get("name")
    if not isinstance(name, str):
        p.add(path, f"a method mapping needs 'name: <method>' (one of: {', '.join(methods())})")
        return None
    if name not in methods():
        p.unknown((*path, "name"), "method", name, methods())
        return None
    spec = get_method(name)
    allowed = ["name", "id", *(["layer"] if spec.needs_layer else []), *spec.defaults]
    options, ok = {}, True
    for key, value in entry.items():
        if key not in allowed:
            ok = False
            p.unknown((*path, key), f"option of method {name!r}", key, allowed)
        elif key not in ("name", "id", "layer"):
            options[key] = value
    layer, given_id = entry.get("layer"), entry.get("id")
    if layer is not None and not isinstance(layer, str):
        ok = False
        p.add((*path, "layer"), f"expected a module name (str), got {layer!r}")
    if given_id is not None and (not isinstance(given_id, str) or not given_id.strip()):
        ok = False
        p.add((*path, "id"), f"expected a non-empty string, got {given_id!r}")
    elif given_id is not None and (not given_id.isprintable() or "::" in given_id):
        ok = False
        p.add((*path, "id"), f"expected one printable line without '::' (it names items and "
                             f"report rows), got {given_id!r}")  # fmt: skip
    if not ok:
        return None
    try:
        spec.bind(options)
    except SaliencyError as exc:
        p.add(path, str(exc))
        return None
    ident = method_id({"name": name, "id": given_id, **options})
    return MethodEntry(name, options, layer, ident, path)


def _checks(p: _Problems, raw: Any) -> dict[str, dict[str, Any]]:
    names = _registry()
    if raw is None:
        return {name: {} for name in DEFAULT_CHECKS}
    if not isinstance(raw, dict) or not raw:
        p.add(("checks",), f"expected a mapping with one or more of: {', '.join(names)}")
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, settings in raw.items():
        if name not in names:
            p.unknown(("checks", name), "check", name, names)
            continue
        settings = _check_settings(p, ("checks", name), name, settings, per_model=False)
        if settings is not None:
            out[name] = settings
    return out


def _check_settings(p: _Problems, path: KeyPath, name: str, settings: Any, *, per_model: bool
                    ) -> dict[str, Any] | None:  # fmt: skip
    """One check's settings at ``path`` (the suite's, or a model's own: no ``methods:``
    there, which methods run is the suite's), validated by the check's schema."""
    check = _check(name)
    keys = (*check.suite_keys, *([] if per_model else ["methods"]))
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        p.add(path, f"expected a mapping of settings ({', '.join(keys)})")
        return None
    for key, value in settings.items():
        limit = check.threshold.key
        if key in ("max_similarity", "min_rise") and key != limit:
            p.add((*path, key), f"{name} passes by {limit} ({check.threshold.help}), "
                  f"not by {key}; write {limit}: X")  # fmt: skip
        elif key == "similarity" and not check.similarity:
            p.add((*path, key), f"{name} compares the complexity of maps, not "
                  f"their similarity: no metric (its settings: {', '.join(keys)})")  # fmt: skip
        elif key == "methods" and per_model:
            p.add((*path, key), "which methods a check runs is the suite's (checks."
                  f"{name}.methods); a model's own checks: settings tune how it runs")  # fmt: skip
        elif key not in keys:
            p.unknown((*path, key), f"setting of {name}", key, keys)
        else:
            _check_setting(p, (*path, key), key, value, check)
    return dict(settings)


def _expect(p: _Problems, raw: Any, ids: list[str], checks: dict[str, dict],
            where: KeyPath = ("expect",)) -> dict:  # fmt: skip
    out: dict[tuple[str, str], str] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        p.add(where, "expected a mapping: method id -> fail, or -> {check: fail}")
        return out
    from .report import expectations

    outcomes = expectations()
    valid = ", ".join(repr(o) for o in outcomes)
    for ident, value in raw.items():
        if ident not in ids:
            p.unknown((*where, ident), "method id", ident, ids)
            continue
        if not isinstance(value, dict) and value not in outcomes:  # one message, not one per check
            p.add((*where, ident), f"expected one of {valid} or {{check: one of them}}, got "
                                   f"{value!r}")  # fmt: skip
            continue
        runs = [c for c in checks if not isinstance(checks[c].get("methods"), list)
                or ident in checks[c]["methods"]]  # fmt: skip
        per_check = value if isinstance(value, dict) else dict.fromkeys(runs, value)
        for check, outcome in per_check.items():
            path = (*where, ident) + ((check,) if isinstance(value, dict) else ())
            if check not in checks:
                p.unknown(path, "check", check, list(checks))
            elif check not in runs:
                p.add(path, f"{check} does not run {ident!r} (its methods: "
                            f"{', '.join(checks[check]['methods'])})")  # fmt: skip
            elif outcome not in outcomes:
                p.add(path, f"expected one of {valid}, got {outcome!r}")
            else:
                out[(ident, check)] = outcome
    return out


DATA_KEYS = ("data", "samples", "per_class")  # inputs drawn from a Dataset or DataLoader


def _inputs(p: _Problems, key: str | KeyPath, value: Any) -> None:
    """``inputs:``: a source (see :func:`_source`), or ``{data: <Dataset or DataLoader>,
    samples: N, per_class: K}``."""
    path = key if isinstance(key, tuple) else (key,)
    if not isinstance(value, dict):
        _source(p, path, value)
        return
    for k in value:
        if k not in DATA_KEYS:
            p.unknown((*path, k), "key of inputs", k, DATA_KEYS)
    if value.get("data") is None:
        p.add(
            path,
            "inputs as a mapping needs 'data:' naming a Dataset or DataLoader "
            "('package.module:attribute'), with optional samples: N and per_class: K",
        )
        # fmt: skip
    else:
        _source(p, (*path, "data"), value["data"])
    for k in ("samples", "per_class"):
        n = value.get(k)
        if k in value and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            p.add((*path, k), f"expected an int >= 1, got {n!r}")


def _source(p: _Problems, key: str | KeyPath, value: Any, *, allow_list: bool = False) -> None:
    path = key if isinstance(key, tuple) else (key,)
    key = path[-1]
    if isinstance(value, str) and value.lower().endswith(_TENSOR_FILE) and key != "model":
        return
    if isinstance(value, str) and _IMPORT_PATH.match(value):
        return
    if allow_list and isinstance(value, list) and value and all(type(v) is int for v in value):
        return
    forms = "'package.module:attribute'"
    if isinstance(value, str) and ":" not in value and "." in value.strip("."):
        module, _, attr = value.rpartition(".")
        forms += f" (did you mean '{module}:{attr}'?)"
    if key != "model":
        forms += " or a path to a .pt file (relative to the suite file)"
    if allow_list:
        forms += ", or a list of class indices"
    p.add(path, f"expected {forms}, got {value!r}")


def _targets(p: _Problems, path: KeyPath, value: Any) -> None:
    """``targets:``: class indices (a source or a list, as before), or ``{kind: ..., ...}``."""
    if not isinstance(value, dict):
        _source(p, path, value, allow_list=True)
        return
    kinds = tuple(TARGET_KEYS)
    kind = value.get("kind")
    if kind is not None and not isinstance(kind, str):
        p.add((*path, "kind"), f"expected a target kind (one of: {', '.join(kinds)}), got "
                               f"{kind!r}")  # fmt: skip
        return
    if kind is None:
        p.add(path, f"a target mapping needs 'kind:' (one of: {', '.join(kinds)}), e.g. "
                    "{kind: segmentation, index: 3}")  # fmt: skip
        return
    if kind not in TARGET_KEYS:
        p.unknown((*path, "kind"), "target kind", kind, kinds)
        return
    allowed = TARGET_KEYS[kind]
    for key in value:
        if key != "kind" and key not in allowed:
            p.unknown((*path, key), f"key of a {kind} target", key, ("kind", *allowed))
    required = TARGET_REQUIRED.get(kind)
    if required and value.get(required) is None:
        p.add(path, f"a {kind} target needs '{required}:'")

    def ints(key: str, *, allow_int: bool = True) -> None:
        v = value.get(key)
        if v is None:
            return
        if allow_int and type(v) is int and v >= 0:
            return
        if allow_int and isinstance(v, str) and _IMPORT_PATH.match(v):
            return  # a LongTensor [N] (or a callable returning one), imported when it runs
        if isinstance(v, list) and v and all(type(i) is int and i >= 0 for i in v):
            return
        forms = ("a non-negative int, a list of them (one per input) or "
                 "'package.module:attribute' (a LongTensor [N])") if allow_int \
            else "a list of label indices"  # fmt: skip
        p.add((*path, key), f"expected {forms}, got {v!r}")

    ints("index")
    ints("unit")
    ints("labels", allow_int=False)
    threshold = value.get("threshold")
    if threshold is not None and (type(threshold) not in (int, float)
                                  or not math.isfinite(threshold)):  # fmt: skip
        p.add(
            (*path, "threshold"),
            f"expected a number (0 for logits, 0.5 for probabilities), got {threshold!r}",
        )
    pixels = value.get("pixels")
    if pixels is not None and pixels not in ("predicted", "all"):
        p.unknown((*path, "pixels"), "pixels", pixels, ("predicted", "all"))
    function = value.get("function")
    if function is not None and not (isinstance(function, str) and _IMPORT_PATH.match(function)):
        p.add((*path, "function"), f"expected 'package.module:function', got {function!r}")


def _output(p: _Problems, path: KeyPath, value: Any) -> None:
    """``output:``: an index, a key or attribute name, or ``{call: package.module:function}``."""
    if type(value) is int or (isinstance(value, str) and value):
        return
    if isinstance(value, dict) and list(value) == ["call"]:
        call = value["call"]
        if not (isinstance(call, str) and _IMPORT_PATH.match(call)):
            p.add((*path, "call"), f"expected 'package.module:function', got {call!r}")
        return
    p.add(path, "expected an index of a returned tuple (0), a key of a returned dict or an "
                "attribute ('out', 'logits'), or {call: 'package.module:function'}, got "
                f"{value!r}")  # fmt: skip


def parse_suite(data: Any, lines: dict[KeyPath, int], file: Path, label: str) -> Suite:
    """Validate a loaded suite; raise :class:`SuiteError` listing every mistake."""
    p = _Problems(label, lines)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        p.add((), f"a suite is a mapping with keys {', '.join(TOP_KEYS)}; got {got}")
        p.raise_if_any()
    for key in data:
        if key not in TOP_KEYS:
            p.unknown((key,), "key", key, TOP_KEYS)
    if data.get("methods") is None:
        p.add((), "missing required key 'methods'")
    if data.get("model") is None and data.get("models") is None:
        p.add((), "missing required key 'model' (or 'models:' for several)")
    elif data.get("model") is not None and data.get("models") is not None:
        p.add(("models",), "give either 'model:' (one model) or 'models:' (several), not both")
    if data.get("model") is not None and data.get("inputs") is None:
        p.add((), "missing required key 'inputs'")
    if data.get("model") is not None:
        _source(p, "model", data["model"])
    if data.get("inputs") is not None:
        _inputs(p, "inputs", data["inputs"])
    if data.get("targets") is not None:
        _targets(p, ("targets",), data["targets"])
    if data.get("output") is not None:
        _output(p, ("output",), data["output"])
    top = {k: data[k] for k in (*SHARED_KEYS, "device") if data.get(k) is not None}
    for key, value in top.items():
        _check_setting(p, (key,), key, value)
    entries: list[MethodEntry] = []
    raw_methods = data.get("methods")
    if raw_methods is not None and (not isinstance(raw_methods, list) or not raw_methods):
        hint = f" (write methods: [{raw_methods}])" if isinstance(raw_methods, str) else ""
        p.add(
            ("methods",),
            f"expected a non-empty list of methods (names or mappings), got {raw_methods!r}{hint}",
        )
    elif raw_methods:
        for i, raw in enumerate(raw_methods):
            entry = _method_entry(p, i, raw)
            if entry is None:
                continue
            twin = next((e for e in entries if e.id == entry.id), None)
            if twin is not None:
                p.add(
                    entry.path,
                    f"duplicate method id {entry.id!r} (also {fmt_path(twin.path)}, "
                    f"line {lines.get(twin.path)}); give one of them an 'id:'",
                )
            else:
                entries.append(entry)
    checks = _checks(p, data.get("checks"))
    ids = [e.id for e in entries]
    for name, settings in checks.items():
        chosen = settings.get("methods")
        if chosen is None:
            continue
        path = ("checks", name, "methods")
        if (
            not isinstance(chosen, list)
            or not chosen
            or not all(isinstance(c, str) for c in chosen)
        ):
            p.add(path, f"expected a non-empty list of method ids (of: {', '.join(ids)}), got "
                        f"{chosen!r}")  # fmt: skip
            continue
        for i, ident in enumerate(chosen):
            if ident not in ids and raw_methods:
                p.unknown((*path, i), "method id", ident, ids)
            elif ident in chosen[:i]:
                p.add((*path, i), f"{ident!r} is listed twice")
    for entry in entries:
        runs = [
            c for c, st in checks.items()
            if not isinstance(st.get("methods"), list) or entry.id in st["methods"]
        ]  # fmt: skip
        if checks and not runs:
            p.add(entry.path, f"no check runs {entry.id!r}: every check's 'methods:' leaves it "
                              "out; add it to one or remove the entry")  # fmt: skip
    for key in ("max_similarity", "min_rise", "similarity"):
        users = [c for c in checks if key in _check(c).suite_keys]
        if key in top and checks and not users:
            takers = [c for c in _registry() if key in _check(c).suite_keys]
            p.add((key,), f"{key} applies to {', '.join(takers)}, which this suite does not run "
                  f"(its checks: {', '.join(checks)}); remove it or add such a check")  # fmt: skip
    expect = _expect(p, data.get("expect"), [e.id for e in entries], checks)
    models = _models(p, data, checks, entries, expect)
    p.raise_if_any()
    return Suite(file, label, lines, models, top, entries, checks)


def _models(p: _Problems, data: dict, checks: dict[str, dict], entries: list[MethodEntry],
            expect: dict) -> list[ModelSpec]:  # fmt: skip
    """The suite's models: its one ``model:``, or each entry of ``models:`` with the suite's
    inputs, targets, check settings and expectations under its own."""
    top = {key: data.get(key) for key in ("inputs", "targets", "output")}
    if data.get("models") is None:
        if data.get("model") is None:
            return []
        spec = ModelSpec(None, data["model"], top["inputs"], top["targets"], None,
                         {c: dict(st) for c, st in checks.items()}, dict(expect), {},
                         output=top["output"])  # fmt: skip
        _needs_twins(p, spec, ("checks",))
        return [spec]
    raw = data["models"]
    if not isinstance(raw, dict) or not raw:
        p.add(("models",), "expected a mapping of model id -> 'package.module:attribute' or "
                           f"{{{', '.join(MODEL_KEYS)}}}, got {raw!r}")  # fmt: skip
        return []
    out: list[ModelSpec] = []
    ids = [e.id for e in entries]
    for ident, value in raw.items():
        where: KeyPath = ("models", ident)
        if not isinstance(ident, str) or not _MODEL_ID.match(ident):
            p.add(
                where,
                "a model id is letters, digits, '_', '.', '+' or '-' (it names "
                f"the items: suite.yaml::<model>::<check>[<method>]), got {ident!r}",
            )
            # fmt: skip
            continue
        if isinstance(value, str):
            value = {"model": value}
            paths = {"model": where}
        elif isinstance(value, dict):
            paths = {k: (*where, k) for k in value if value[k] is not None}
            for key in value:
                if key not in MODEL_KEYS:
                    p.unknown((*where, key), "key of a model", key, MODEL_KEYS)
        else:
            p.add(where, f"expected 'package.module:attribute' or a mapping with "
                         f"{', '.join(MODEL_KEYS)}, got {value!r}")  # fmt: skip
            continue
        if value.get("model") is None:
            p.add(where, "missing required key 'model' (the model's import path)")
            continue
        _source(p, paths["model"], value["model"])
        if value.get("inputs") is not None:
            _inputs(p, (*where, "inputs"), value["inputs"])
        if value.get("targets") is not None:
            _targets(p, (*where, "targets"), value["targets"])
        if value.get("output") is not None:
            _output(p, (*where, "output"), value["output"])
        if value.get("inputs") is None and top["inputs"] is None:
            p.add(where, "missing 'inputs:' (give it here, or once at the top level for every "
                         "model)")  # fmt: skip
        layer = value.get("layer")
        if layer is not None and not isinstance(layer, str):
            p.add((*where, "layer"), f"expected a module name (str), got {layer!r}")
            layer = None
        merged = {c: dict(st) for c, st in checks.items()}
        check_paths: dict[tuple[str, str], KeyPath] = {}
        own = value.get("checks")
        if own is not None and not isinstance(own, dict):
            p.add((*where, "checks"), f"expected a mapping of check -> settings (of: "
                                      f"{', '.join(checks)}), got {own!r}")  # fmt: skip
        for name, settings in (own or {}).items() if isinstance(own, dict) else ():
            path = (*where, "checks", name)
            if name not in checks:
                runs = ", ".join(checks)
                p.add(path, f"this suite does not run {name!r} (its checks: {runs}); a model's "
                            "checks: tune the suite's checks for that model")  # fmt: skip
                continue
            settings = _check_settings(p, path, name, settings, per_model=True)
            if settings is not None:
                merged[name].update(settings)
                check_paths.update({(name, k): (*path, k) for k in settings})
        own_expect = _expect(p, value.get("expect"), ids, checks, (*where, "expect"))
        own_inputs, own_targets = value.get("inputs"), value.get("targets")  # null: the suite's
        own_output = value.get("output")
        spec = ModelSpec(
            ident, value["model"], top["inputs"] if own_inputs is None else own_inputs,
            top["targets"] if own_targets is None else own_targets, layer, merged,
            {**expect, **own_expect}, paths, check_paths,
            output=top["output"] if own_output is None else own_output,
        )  # fmt: skip
        _needs_twins(p, spec, where)
        out.append(spec)
    return out


def _needs_twins(p: _Problems, spec: ModelSpec, where: KeyPath) -> None:
    """A check with a second model (data randomization's twin) needs it named, for this
    model: in the suite's check settings, or in the model's own."""
    for name, settings in spec.checks.items():
        check = _check(name)
        for model in check.models[1:]:
            key = check.model_keys.get(model, model)
            if settings.get(key) is not None:
                continue
            there = (f"in checks.{name} or models.{spec.id}.checks.{name}; "
                     if spec.id is not None else "")  # fmt: skip
            p.add(
                ("checks", name) if spec.id is None else where,
                f"{name} needs '{key}:' naming {check.model_help.get(model, model)} ({there}the "
                "forms of the top-level 'model:', e.g. 'package.module:attribute')",
            )


# --- loading ----------------------------------------------------------------------------------


# What the user's import or factory may raise that becomes a located collection error:
# a SystemExit too (a script's exit at import), but never Ctrl-C, and never pytest's own
# outcomes (pytest.importorskip at import skips the suite, as it skips a test module).
_USER_ERRORS = (Exception, SystemExit)


def _user_error(exc: BaseException) -> str:
    """``TypeName: message (at file:line)``: the user's exception, no traceback."""
    # The innermost frame outside the import machinery is where the user's code raised.
    machinery = (str(Path(importlib.__file__).parent), __file__)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<", *machinery))
    ]
    at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{at}"


@contextlib.contextmanager
def _search_path(search: list[str]) -> Iterator[None]:
    """``search`` on ``sys.path`` for the block: imports, and factories that import lazily."""
    added = [p for p in search if p not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for entry in added:
            sys.path.remove(entry)


def _import_object(spec: str, search: list[str]) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        with _search_path(search):
            obj = importlib.import_module(module_name)
    except _USER_ERRORS as exc:
        raise SaliencyError(f"could not import {module_name!r}: {_user_error(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            near = closest(part, [n for n in dir(obj) if not n.startswith("_")])
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise SaliencyError(
                f"{getattr(obj, '__name__', obj)!r} has no attribute {part!r}{hint}"
            )
        obj = getattr(obj, part)
    return obj


def _call_factory(spec: str, obj: Any) -> Any:
    try:
        return obj()
    except _USER_ERRORS as exc:
        raise SaliencyError(f"calling {spec}() raised {_user_error(exc)}") from None


@dataclass
class Loaded:
    """What a suite's import paths gave, on the CPU / device the user's code chose."""

    model: Any
    inputs: Any
    targets: Any
    # each check's extra model (data randomization's permuted-label twin), by check name
    others: dict[str, Any] = field(default_factory=dict)
    output: Any = None  # what output= the audits get (an int, a str or a callable)


def load_objects(suite: Suite, spec: ModelSpec, search: list[str],
                 cache: dict[str, Any] | None = None, seed: int = 0) -> Loaded:  # fmt: skip
    """Import the model, inputs and targets of ``spec``; errors name the key and line.
    ``cache`` keeps inputs and targets by source, for the file's other models; ``seed``
    draws the inputs from a Dataset or DataLoader."""
    import torch
    from torch import nn

    from .explainer import check_inputs

    cache = {} if cache is None else cache

    def fail(key: str, message: str) -> SuiteError:
        return SuiteError(f"{suite.where(spec.path(key))}: {message}")

    def tensor_from(key: str, value: str) -> Any:
        if value.lower().endswith(_TENSOR_FILE):
            file = (suite.file.parent / value).resolve()
            if not file.is_file():
                raise fail(
                    key, f"file {str(file)!r} does not exist (paths are relative to the suite file)"
                )
            try:
                return torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise fail(key, f"could not load {str(file)!r}: {_user_error(exc)}") from None
        if value not in cache:
            obj = _import_object(value, search)
            cache[value] = (
                _call_factory(value, obj)
                if callable(obj) and not isinstance(obj, torch.Tensor)
                else obj
            )
        return cache[value]

    def module_from(spec: str) -> Any:
        obj = _import_object(spec, search)
        if not isinstance(obj, nn.Module):
            if not callable(obj):
                raise SaliencyError(
                    f"{spec} is a {type(obj).__name__}, not a torch.nn.Module or a "
                    "zero-argument callable returning one"
                )
            obj = _call_factory(spec, obj)
            if not isinstance(obj, nn.Module):
                raise SaliencyError(
                    f"{spec}() returned a {type(obj).__name__}; expected a torch.nn.Module"
                )
        return obj

    try:
        model = module_from(spec.model)
    except SaliencyError as exc:
        raise fail("model", str(exc)) from None
    others: dict[str, Any] = {}
    for check, settings in spec.checks.items():
        source = settings.get("model")
        if source is not None:
            try:
                others[check] = model if source == spec.model else module_from(source)
            except SaliencyError as exc:
                where = suite.where(spec.setting_path(check, "model"))
                raise SuiteError(f"{where}: {exc}") from None
    from .data import DEFAULT_SAMPLES, is_data, sample

    drawn = spec.inputs if isinstance(spec.inputs, dict) else {"data": spec.inputs}
    source = drawn["data"]
    try:
        inputs = tensor_from("inputs", source)
        if is_data(inputs):  # a seeded, class-balanced batch of a Dataset or DataLoader
            try:
                inputs = sample(inputs, drawn.get("samples", DEFAULT_SAMPLES),
                                per_class=drawn.get("per_class"), seed=seed)[0]  # fmt: skip
            except SaliencyError:
                raise
            except _USER_ERRORS as exc:  # the dataset's own code (its __getitem__)
                raise SaliencyError(f"reading its items raised {_user_error(exc)}") from None
        elif len(drawn) > 1:
            raise SaliencyError(
                f"samples and per_class draw from a Dataset or DataLoader, and this is a "
                f"{type(inputs).__name__}; give the dataset, or leave them out"
            )
        check_inputs(inputs)
    except SaliencyError as exc:
        raise fail("inputs", f"{source}: {exc}") from None
    targets = spec.targets
    if isinstance(targets, dict):
        try:
            targets = _target_object(targets, search, len(inputs), tensor_from)
        except SaliencyError as exc:
            raise fail("targets", str(exc)) from None
    elif targets is not None:
        try:
            raw = targets if isinstance(targets, list) else tensor_from("targets", targets)
            targets = _as_targets(raw, len(inputs))
        except SaliencyError as exc:
            raise fail("targets", str(exc)) from None
    output = spec.output
    if isinstance(output, dict):
        try:
            output = _import_object(output["call"], search)
            if not callable(output):
                raise SaliencyError(
                    f"{spec.output['call']} is a {type(output).__name__}, not a callable"
                )
        except SaliencyError as exc:
            raise fail("output", str(exc)) from None
    return Loaded(model, inputs, targets, others, output)


def _target_object(raw: dict, search: list[str], n: int, tensor_from: Any) -> Any:
    """The target object a ``targets: {kind: ...}`` mapping describes (validated keys)."""
    import torch

    from .engine.targets import KINDS, CallableTarget

    def index(key: str) -> Any:
        v = raw.get(key)
        if isinstance(v, str):
            found = tensor_from("targets", v)
            if not isinstance(found, torch.Tensor):
                raise SaliencyError(
                    f"{key}: {v} is a {type(found).__name__}; expected a LongTensor [{n}] of "
                    "class indices (or a callable returning one)"
                )
            return _as_targets(found, n)
        if isinstance(v, list):
            if len(v) != n:
                raise SaliencyError(
                    f"{key}: a list gives one index per input, so it needs {n} entries "
                    f"(the inputs' batch), got {len(v)}; or give one int for every input"
                )
            return torch.tensor(v, dtype=torch.long)
        return v

    kind = raw["kind"]
    if kind in KINDS:  # the keys are the kind's own arguments (validated at collection)
        args = {k: v for k, v in raw.items() if k != "kind" and v is not None}
        for key in ("index", "unit"):
            if key in args:
                args[key] = index(key)
        return KINDS[kind](**args)
    fn = _import_object(raw["function"], search)
    if not callable(fn):
        raise SaliencyError(f"{raw['function']} is a {type(fn).__name__}, not a callable")
    return CallableTarget(fn)


def _named(inputs: str | dict) -> str:
    return inputs["data"] if isinstance(inputs, dict) else inputs


def check_forward(suite: Suite, spec: ModelSpec, loaded: Loaded) -> None:
    """One input through the model (eval mode, no grad, flags restored), so inputs the model
    cannot take, or targets it has no class for, are one located error, not a traceback
    in every item."""
    import torch

    from .engine.state import eval_mode, model_device_dtype

    model, inputs = loaded.model, loaded.inputs
    device, dtype = model_device_dtype(model, inputs)
    try:
        with eval_mode(model), torch.no_grad():
            out = model(inputs[:1].to(device=device, dtype=dtype))
    except Exception as exc:
        where = suite.where(spec.path("inputs"))
        raise SuiteError(
            f"{where}: the model cannot run on {_named(spec.inputs)} (shape "
            f"{list(inputs.shape)}): {_user_error(exc)}"
        ) from None
    targets = loaded.targets
    from .engine.targets import ClassLogit, Output, Target

    try:
        selected = Output(loaded.output)(out, type(model).__name__)
    except SaliencyError as exc:
        if loaded.output is None:
            return  # what the model returns is the audit's to refuse, with its message
        raise SuiteError(f"{suite.where(spec.path('output'))}: {exc}") from None
    if isinstance(targets, Target) and not isinstance(targets, ClassLogit):
        try:
            checked = targets.check(selected, 1, type(model).__name__)
            first = targets.per_sample()
            if first is not None:
                first = first[:1]
            if targets.kind in ("multilabel", "regression", "binary"):
                targets.resolve(checked, first)  # labels and units in range, a unit named
        except SaliencyError as exc:
            raise SuiteError(f"{suite.where(spec.path('targets'))}: {exc}") from None
        index = getattr(targets, "index", getattr(targets, "unit", None))
        count = 2 if targets.kind == "binary" else selected.shape[1] if selected.dim() > 1 else 1
        found = torch.as_tensor(index).reshape(-1) if index is not None else None
        if found is not None and found.numel() and (int(found.min()) < 0
                                                    or int(found.max()) >= count):  # fmt: skip
            has = "2 classes (one logit)" if targets.kind == "binary" else f"{count} outputs"
            raise SuiteError(
                f"{suite.where(spec.path('targets'))}: {targets.noun} indices must be in "
                f"[0, {count - 1}] (the model has {has}), got {found.tolist()}"
            )
        return
    if isinstance(targets, ClassLogit):
        targets = None if targets.index is None else torch.as_tensor(targets.index).reshape(-1)
    if selected.dim() == 2 and targets is not None:
        classes = selected.shape[1]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
            raise SuiteError(
                f"{suite.where(spec.path('targets'))}: class indices must be in [0, {classes - 1}] "
                f"(the model has {classes} outputs), got {targets.tolist()}"
            )


def _as_targets(raw: Any, n: int) -> Any:
    import torch

    if not isinstance(raw, (torch.Tensor, list, tuple)):
        raise SaliencyError(f"expected a LongTensor [N] of class indices, got {type(raw).__name__}")
    t = torch.as_tensor(raw)
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() != 1 or t.shape[0] != n:
        raise SaliencyError(
            f"expected integer class indices of shape [{n}] (one per input), got dtype {t.dtype} "
            f"shape {list(t.shape)}"
        )
    return t.long()


def check_layers(suite: Suite, spec: ModelSpec, model: Any) -> None:
    """Every layer a suite names for this model must be one of its modules (one located
    error listing them all otherwise)."""
    from .engine.layers import parse_cam_layer, resolve_layer

    p = _Problems(suite.label, suite.lines)
    named = [((*e.path, "layer"), e.layer) for e in suite.methods if e.layer is not None]
    if spec.layer is not None:
        named.append((spec.path("layer"), spec.layer))
    for path, layer in named:
        try:
            parse_cam_layer(model, layer)
        except SaliencyError as exc:
            p.add(path, str(exc))
    for check, settings in spec.checks.items():
        layers = settings.get("layers")
        for i, name in enumerate(layers if isinstance(layers, list) else []):
            try:
                resolve_layer(model, name)
            except SaliencyError as exc:
                p.add((*spec.setting_path(check, "layers"), i), str(exc))
    p.raise_if_any()


def check_twins(suite: Suite, spec: ModelSpec, loaded: Loaded) -> None:
    """A check's extra model (data randomization's twin) must be the model's architecture: a
    located error at its ``model:`` key naming the first mismatch, not one per item."""
    from .checks.data import check_twin

    for check, twin in loaded.others.items():
        try:
            check_twin(loaded.model, twin, label=f"{spec.checks[check]['model']}")
        except SaliencyError as exc:
            where = suite.where(spec.setting_path(check, "model"))
            raise SuiteError(f"{where}: {exc}") from None


# --- pytest nodes -----------------------------------------------------------------------------


class _Holder:
    """What the items of one model share: the model, inputs and targets, loaded when the
    first of them runs (once per process; the error too, if loading fails), placed on each
    device once, and the results of shared audits until their items run."""

    spec: ModelSpec

    def _init_holder(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._loaded: Loaded | BaseException | None = None
        self._failed_first: str | None = None  # the item whose setup showed the load error
        self._placed: dict[str, tuple] = {}
        self._shared: dict[str, dict[str, Any]] = {}  # audit key -> {method id: outcome}
        self._tried: set[tuple[str, str]] = set()  # (audit key, method id) already computed

    @property
    def file_node(self) -> SuiteFile:
        node = self
        while not isinstance(node, SuiteFile):
            node = node.parent
        return node

    @property
    def suite(self) -> Suite:
        """The parsed suite (kept by the file node)."""
        return self.file_node.__dict__["_suite"]

    @suite.setter
    def suite(self, value: Suite) -> None:
        self.__dict__["_suite"] = value

    def items(self) -> Iterator[SuiteItem]:
        suite = self.suite
        for entry in suite.methods:
            for check, settings in suite.checks.items():
                if "methods" in settings and entry.id not in settings["methods"]:
                    continue  # the check runs only the methods it names
                name = f"{check}[{entry.id}]"
                # A string node id is parsed into name + params (pytest >= 9.1), so that it
                # equals the ids --lf reads back from the cache; a child id would not.
                item = SuiteItem.from_parent(
                    self,
                    name=name,
                    nodeid=f"{self.nodeid}::{name}",
                    entry=entry,
                    check=check,
                    expected=self.spec.expect.get((entry.id, check), "pass"),
                )
                if self.config.pluginmanager.hasplugin("xdist"):
                    # --dist loadgroup sends the items of one model to one worker
                    item.add_marker(pytest.mark.xdist_group(name=self.group()))
                yield item

    def group(self) -> str:
        """The xdist group of this model's items: its node id with letters, digits, '.', '-'
        and '_' only (xdist and the report ids read '@', '[', ']' and '::')."""
        return re.sub(r"[^\w.-]", "_", self.nodeid)

    def all_here(self, item: SuiteItem) -> bool:
        """Whether this xdist worker runs every item of this model: under ``--dist
        loadscope`` or ``loadfile`` (a model's items share a scope and a file), or
        ``loadgroup`` when xdist did group them (it marks their ids; with pytest >= 9.2 and
        pytest-xdist <= 3.8 it silently does not)."""
        dist = self.config.workerinput.get("saliency_dist")
        if dist in ("loadscope", "loadfile"):
            return True
        return dist == "loadgroup" and item.nodeid.endswith("@" + self.group())

    def loaded(self, item: SuiteItem) -> Loaded:
        """The model's objects; a located error (the whole message for the first item that
        needs them, a pointer to it for the others) if they cannot be loaded."""
        if self._loaded is None:
            try:
                self._loaded = self.file_node.load(self.spec)
            except (SuiteError, pytest.skip.Exception) as exc:  # importorskip: all skip
                self._loaded = exc
                self._failed_first = item.name
                raise
            except Exception as exc:  # not foreseen: located, and not tried again per item
                where = self.suite.where(self.spec.path("model"))
                self._loaded = SuiteError(f"{where}: loading this model raised {_user_error(exc)}")
                self._failed_first = item.name
                raise self._loaded from exc
        if isinstance(self._loaded, pytest.skip.Exception):
            raise self._loaded
        if isinstance(self._loaded, SuiteError):
            first_line = str(self._loaded).splitlines()[0]
            raise SuiteError(f"{first_line} (as for {self._failed_first}, above)")
        return self._loaded

    def device_or_error(self) -> Any:
        return self.file_node.device_or_error()

    def placed(self, device: Any, check: str | None = None) -> tuple[Any, Any, Any]:
        """Models, inputs and targets on ``device`` (moved once; the user's models are not
        moved): the models are this model, then ``check``'s extra model if it has one."""
        import torch

        key = str(device)
        if key not in self._placed:
            loaded = self._loaded
            assert isinstance(loaded, Loaded), "placed() before the item's setup loaded"
            copies: dict[int, Any] = {}

            def moved(model):  # one copy per model object: a twin that is the model stays it
                if id(model) not in copies:
                    on = any(p.device != device for p in model.parameters())
                    copies[id(model)] = copy.deepcopy(model).to(device) if on else model
                return copies[id(model)]

            targets = loaded.targets
            self._placed[key] = (
                moved(loaded.model),
                {name: moved(m) for name, m in loaded.others.items()},
                loaded.inputs.to(device),
                targets.to(device) if isinstance(targets, torch.Tensor) else targets,
            )
        model, others, inputs, targets = self._placed[key]
        models = [model] + ([others[check]] if check in others else [])
        return models, inputs, targets

    def audit(self, item: SuiteItem, device: Any, settings: dict[str, Any]) -> Any:
        """The item's audit result (or its error, raised).

        The first item of a check to run audits every method of that check selected in this
        session in one list-of-methods call (methods sharing a rule set then share each
        forward+backward) and keeps the others' results here until their items run. When that
        call raises, it is split in halves, and so on, until the error is down to the methods
        that raise it: each of those items gets its own error, and the others their results.
        On an xdist worker, which does not know which items it will get, each item runs its
        own audit, unless the scheduler sends every item of this model to it (see
        :meth:`all_here`): then they share as in a serial run.
        """
        if hasattr(self.config, "workerinput") and not self.all_here(item):
            return item.own_audit(device, settings)
        key = repr((item.check, str(device), sorted(settings.items())))
        done = self._shared.setdefault(key, {})
        if item.entry.id not in done:
            if (key, item.entry.id) in self._tried:  # run before, then asked again
                return item.own_audit(device, settings)
            peers = [
                other for other in item.session.items
                if isinstance(other, SuiteItem) and other.parent is self
                and other.check == item.check and (key, other.entry.id) not in self._tried
            ]  # fmt: skip
            if item not in peers:  # run directly (e.g. item.runtest() outside a session)
                peers.append(item)
            self._tried.update((key, other.entry.id) for other in peers)
            if len(peers) == 1:
                return item.own_audit(device, settings)
            import time

            start = time.perf_counter()
            for other, outcome in self._split(item.check, peers, device, settings):
                done[other.entry.id] = outcome
            seconds = time.perf_counter() - start
            for other in peers:  # each item's duration is its share (plugin's makereport)
                other.shared_seconds = seconds / len(peers)
            item.paid_seconds = seconds
        outcome = done.pop(item.entry.id)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _split(self, check: str, peers: list, device: Any, settings: dict[str, Any]) -> list:
        """``[(item, result or the exception its audit raised)]`` for ``peers``, from as few
        shared calls as the errors allow: a call that raises is retried in halves."""
        outcome = self._call(check, peers, device, settings)
        if not isinstance(outcome, Exception):
            return list(zip(peers, outcome))
        if len(peers) == 1:
            return [(peers[0], outcome)]
        return self._halves(check, peers, device, settings, outcome)

    def _halves(self, check: str, peers: list, device: Any, settings: dict[str, Any],
                error: Exception) -> list:  # fmt: skip
        """The outcomes of ``peers``, whose shared call raised ``error``: each half again.
        When both halves raise that very error (a model that fails for every method, not one
        method's refusal), one call per method settles each item."""
        half = len(peers) // 2
        parts = [peers[:half], peers[half:]]
        found = [self._call(check, part, device, settings) for part in parts]
        same = all(
            isinstance(f, Exception) and (type(f), str(f)) == (type(error), str(error))
            for f in found
        )
        if same and len(peers) > 2:
            return [pair for other in peers for pair in self._split(check, [other], device,
                                                                      settings)]  # fmt: skip
        out = []
        for part, outcome in zip(parts, found):
            if not isinstance(outcome, Exception):
                out += list(zip(part, outcome))
            elif len(part) == 1:
                out.append((part[0], outcome))
            else:
                out += self._halves(check, part, device, settings, outcome)
        return out

    def _call(self, check: str, peers: list, device: Any, settings: dict[str, Any]) -> Any:
        """The results of one shared call for ``peers``, or the exception it raised."""
        models, inputs, targets = self.placed(device, check)
        methods = [o.method_spec() for o in peers]
        try:
            return run_check(check, models, inputs, methods, target=targets,
                             output=self._loaded.output, **settings)  # fmt: skip
        except Exception as exc:
            return exc


class SuiteFile(_Holder, pytest.File):
    """A suite file: validated at collection; one item per (method, check) of its one model,
    or one :class:`SuiteModel` per entry of ``models:``. Nothing is imported until an item
    runs, so ``--co`` and ``-k`` load nothing they do not run."""

    def collect(self) -> Iterator[SuiteItem | SuiteModel]:
        label = self.nodeid or self.path.name
        data, lines = load_yaml(read_suite(self.path, label), label)
        self.suite = parse_suite(data, lines, self.path, label)
        self._objects: dict[str, Any] = {}  # inputs and targets by source, for every model
        self.device_or_error()  # a device this machine lacks: one error here, not one per item
        if self.suite.models[0].id is None:
            self._init_holder(self.suite.models[0])
            yield from self.items()
            return
        for spec in self.suite.models:
            yield SuiteModel.from_parent(self, name=spec.id, spec=spec)

    def load(self, spec: ModelSpec) -> Loaded:
        """Import and check one model's objects (the rootdir and the ``pythonpath`` ini on
        ``sys.path``); every problem is a located :class:`SuiteError`."""
        search = [str(self.config.rootpath)] + [str(p) for p in self.config.getini("pythonpath")]
        from .plugin import get_session

        seed = self.suite.top.get("seed", get_session(self.config).settings.seed)
        with _search_path(search):  # factories and forwards may import lazily
            loaded = load_objects(self.suite, spec, search, self._objects, seed)
            check_forward(self.suite, spec, loaded)
        check_layers(self.suite, spec, loaded.model)
        check_twins(self.suite, spec, loaded)
        return loaded

    def device_or_error(self) -> Any:
        """The suite's device (``--saliency-device`` wins; then its ``device:``; then the ini
        or the default), or a located error naming the remedy."""
        from .plugin import get_session

        settings = get_session(self.config).settings
        wanted = self.suite.top.get("device")
        if settings.device_from_cli or wanted is None:
            return settings.torch_device()
        try:
            return resolve_device(wanted, worker=settings.worker)
        except SaliencyError as exc:
            raise SuiteError(
                f"{self.suite.where(('device',))}: device {exc}; or run with --saliency-device cpu"
            ) from None

    def repr_failure(self, excinfo, style=None):  # a Collector's takes no style (pytest >= 9)
        if isinstance(excinfo.value, SuiteError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


class SuiteModel(_Holder, pytest.Collector):
    """One entry of a suite's ``models:``: its items, ``suite.yaml::<model>::<check>[<id>]``."""

    def __init__(self, *, spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_holder(spec)

    def collect(self) -> Iterator[SuiteItem]:
        yield from self.items()

    def reportinfo(self):
        line = self.suite.lines.get(("models", self.spec.id), 1)
        return self.path, line - 1, self.spec.id


def run_check(check: str, models: list, inputs: Any, method: Any, **kwargs: Any) -> Any:
    """One check through its API function (``model:`` of the check's settings is the extra
    model, already loaded, so it leaves the settings here)."""
    from .checks.base import api, get_check

    kwargs.pop("model", None)
    return api(get_check(check))(*models, inputs, method, **kwargs)


# Frames of the test runner, not of the audit (left out of a crash's traceback).
_RUNNER_PATHS = ("/_pytest/", "/pluggy/", "\\_pytest\\", "\\pluggy\\")


class AuditFailed(Exception):
    """An audit that did not meet its threshold (or a strict expected failure that passed)."""


class SuiteItem(pytest.Item):
    """One audit: a method under one check, with the suite's settings."""

    def __init__(self, *, entry: MethodEntry, check: str, expected: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entry = entry
        self.check = check
        self.expected = expected
        self.paid_seconds = 0.0  # of a shared audit's time, the part this item's call ran

    @property
    def holder(self) -> _Holder:
        """The node that holds this item's model (the file, or its ``models:`` entry)."""
        return self.parent

    def method_spec(self) -> dict[str, Any]:
        """The method as the API takes it, with the CAM layer it reads on this model."""
        layer = self.holder.spec.layer_of(self.entry)
        return {"name": self.entry.name, "layer": layer, **self.entry.options}

    def setup(self) -> None:
        from .plugin import get_session

        get_session(self.config).settings.apply_threads()
        self.holder.loaded(self)  # the model's objects, imported on first use (or its error)

    def settings(self, defaults: Any) -> dict[str, Any]:
        """The model's check keys > the suite's check keys > suite top-level keys > session
        defaults (ini / CLI) > the check's defaults. A threshold or a metric applies only to
        the checks that have one: the result holds the check's threshold under
        ``"threshold"``."""
        suite: Suite = self.holder.suite
        check = _check(self.check)
        key = check.threshold.key
        session_limit = defaults.max_similarity if key == "max_similarity" else None
        base = {
            "seed": defaults.seed,
            key: check.threshold.default if session_limit is None else session_limit,
            "batch_size": None,
            "confidence": False,
        }
        if check.similarity:
            base["similarity"] = defaults.similarity or check.similarity
        merged = {
            **base,
            **{k: v for k, v in suite.top.items() if k != "device"},
            **self.holder.spec.checks[self.check],
        }
        merged["threshold"] = merged.pop(key)
        merged.pop("methods", None)  # which items the check has, not an audit setting
        for other in ("max_similarity", "min_rise", *([] if check.similarity else ["similarity"])):
            merged.pop(other, None)
        return merged

    def runtest(self) -> None:
        from .plugin import get_session, item_nodeid

        session = get_session(self.config)
        settings = self.settings(session.settings)
        threshold = float(settings.pop("threshold"))
        confidence = bool(settings.pop("confidence"))
        device = self.holder.device_or_error()
        from .plugin import Progress
        from .progress import listening

        try:
            with listening(Progress(self.config, f"{self.holder.nodeid} :: {self.check}")):
                result = self.holder.audit(self, device, settings)
        except Exception as exc:
            self.raised(session, exc, device, threshold, confidence, settings)
            raise  # not reached: raised() always raises
        try:
            record = session.record(
                item_nodeid(self),
                result,
                threshold=threshold,
                confidence=confidence,
                expected=self.expected,
                method_id=self.entry.id,
                source="suite",
                device=str(device),
                model=self.holder.spec.id,
            )
        except SaliencyError as exc:  # e.g. confidence: true with one sample
            raise SuiteError(f"{self.location_text()}: {exc}") from None
        from .plugin import junit_properties

        self.user_properties.extend(junit_properties(record))
        verdict = record["verdict"]
        if verdict == "xfail":
            pytest.xfail(f"expected failure: {self.check} of {self.entry.id} is not sensitive")
        if verdict in ("fail", "xpass"):
            raise AuditFailed(
                failure_text(self.location_text(), result, record, threshold, confidence)
            )

    def raised(self, session: Any, exc: Exception, device: Any, threshold: float,
               confidence: bool, settings: dict[str, Any]) -> None:  # fmt: skip
        """Record the audit that raised ``exc`` as a row, then end the item: xfailed when the
        suite expects this refusal, else failed with the error (located when it is ours)."""
        from .errors import REFUSALS, first_line, refusal_kind
        from .plugin import item_nodeid, junit_properties

        record = session.record_error(
            item_nodeid(self), exc, check=self.check, method=self.entry.name,
            method_id=self.entry.id, options=self.entry.options, threshold=threshold,
            confidence=confidence, expected=self.expected, source="suite", device=str(device),
            seed=settings.get("seed"), settings={k: v for k, v in settings.items() if k != "seed"},
            model=self.holder.spec.id,
        )  # fmt: skip
        self.user_properties.extend(junit_properties(record))
        if record["verdict"] == "refused":
            pytest.xfail(f"refused as expected (expect: {self.expected}): {first_line(exc)}")
        note = ""
        if self.expected in REFUSALS:
            kind = refusal_kind(exc)
            got = f"the refusal {kind!r}" if kind else "an error that is no refusal"
            note = (
                f" [expect: {self.expected} was stated, but this is {got} "
                f"({type(exc).__name__}); valid refusals: {', '.join(REFUSALS)}]"
            )
        if isinstance(exc, SaliencyError):
            raise SuiteError(f"{self.location_text()}: {exc}{note}") from None
        if note and hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(note.strip(" []"))
        raise exc

    def own_audit(self, device: Any, settings: dict[str, Any]) -> Any:
        """This item's audit on its own (one method)."""
        models, inputs, targets = self.holder.placed(device, self.check)
        # a one-item list: the method's own options (a smoothgrad seed) stay the method's
        return run_check(
            self.check,
            models,
            inputs,
            [self.method_spec()],
            target=targets,
            output=self.holder._loaded.output,
            **settings,
        )[0]

    def location_text(self) -> str:
        where = self.holder.suite.where(self.entry.path)
        model = self.holder.spec.id
        return where if model is None else f"{where} (model {model})"

    def _repr_failure_py(self, excinfo, style=None):  # what pytest shows for setup errors
        if isinstance(excinfo.value, SuiteError):
            return str(excinfo.value)
        return super()._repr_failure_py(excinfo, style=style)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (AuditFailed, SuiteError)):
            return str(excinfo.value)
        # A crash: its traceback from the audit down, without pytest's and pluggy's frames,
        # one line a frame unless --tb asks for another style.
        excinfo.traceback = excinfo.traceback.filter(
            lambda entry: (
                not any(part in str(entry.path) for part in _RUNNER_PATHS)
                and Path(str(entry.path)) != Path(__file__)
            )  # this item's own plumbing
        )
        if style is None and self.config.getoption("tbstyle", "auto") == "auto":
            style = "short"
        return f"{self.location_text()}: the audit raised\n" + str(
            super().repr_failure(excinfo, style=style)
        )

    def reportinfo(self):
        line = self.holder.suite.lines.get(self.entry.path, 1)
        model = self.holder.spec.id
        name = f"{self.check}[{self.entry.id}]"
        return self.path, line - 1, name if model is None else f"{model}::{name}"


def failure_text(where: str, result: Any, record: dict, threshold: float, confidence: bool) -> str:
    """Why the item failed, the result's summary table and its most similar samples."""
    import torch

    rule = result.threshold
    key, at_most = rule.key, rule.passes == "at_most"
    score = result.score
    low, high = result.ci
    bound = high if at_most else low
    side = "upper" if at_most else "lower"
    measured = f"score {score:.3f}" + (f", CI {side} bound {bound:.3f}" if confidence else "")
    expected = record.get("expected", "pass")
    if record["verdict"] == "xpass" and expected != "fail":
        head = (
            f"expected a refusal (expect: {expected}), but the audit ran and passed "
            f"({measured} {rule.symbol()} {key} {threshold:g}); the engine vouches for this "
            "map now: remove its 'expect' entry"
        )
    elif record["verdict"] == "xpass":
        head = (
            f"expected to fail (expect: fail), but the audit passed ({measured} "
            f"{rule.symbol()} {key} {threshold:g}); the method is sensitive now: remove its "
            "'expect' entry"
        )
    elif math.isnan(score):
        head = f"{result.method}: some maps were constant, so {result.check} has no valid score"
    elif record.get("regressed"):
        from .report import _regression

        head = f"{result.method} got worse under {result.check}: {_regression(record)}"
    else:
        met = score <= threshold if at_most else score >= threshold
        limit = bound if confidence and met else score
        head = (
            f"{result.method} is not sensitive enough under {result.check}: "
            f"{limit:.3f} {'>' if at_most else '<'} {key} {threshold:g} ({measured})"
        )
    if expected not in ("pass", "fail") and record["verdict"] != "xpass":
        head += f" [expect: {expected} was stated: the audit ran instead of being refused]"
    lines = [f"{where}: {head}", "", result.summary()]
    row = result._worst()  # the per-sample scores the verdict reads
    sign = 1.0 if at_most else -1.0  # the worst samples first: most similar, or least risen
    order = torch.argsort((sign * row).nan_to_num(-1e9), descending=True).tolist()
    finite = [i for i in order if not math.isnan(float(row[i]))]
    if finite:
        worst = "most similar" if at_most else "least risen"
        shown = ", ".join(f"#{i} ({float(row[i]):.3f})" for i in finite[:3])
        lines += ["", f"{worst} samples: {shown}"]
    return "\n".join(lines)
