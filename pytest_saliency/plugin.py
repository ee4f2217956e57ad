"""The pytest plugin: options, the ``saliency`` marker and fixtures, the verdict table, reports.

Nothing here imports torch at import time: a pytest run that uses no audit must not pay for it.
torch is imported inside hooks and fixtures, only once an audit, a CUDA device or a report asks.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import report
from .errors import SaliencyError
from .specs import method_id, parse_method

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .checks import AuditResult

MARKER_KEYS = ("methods", "max_similarity", "min_rise", "similarity", "seed", "confidence",
               "batch_size", "target", "output")  # fmt: skip
MARKER_HELP = (
    "saliency(methods=[...], max_similarity=X, min_rise=X, similarity=NAME, seed=N, "
    "confidence=False, batch_size=None, target=None, output=None): audit settings for the "
    "`saliency` fixture; `methods` parametrizes `saliency_method` (a name or {'name': ..., "
    "**options}); `target` and `output` say what is explained (see pytest_saliency.explain)."
)


def _device_arg(value: str) -> str:
    from .devices import CHOICES, valid

    if not valid(value):
        import argparse

        raise argparse.ArgumentTypeError(f"{value!r}: expected {CHOICES}")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("saliency", "saliency map audits (pytest-saliency)")

    def add(flag: str, ini: str, help: str, default: Any, ini_type: Any = "string", **kw):
        # CLI defaults are None so that an ini value shows through when the flag is absent.
        group.addoption(flag, dest=ini, default=None, help=f"{help} (ini: {ini})", **kw)
        parser.addini(ini, help, type=ini_type, default=default)

    add("--saliency-device", "saliency_device", "audit device: auto (cuda if available), cpu, "
        "cuda or cuda:N; wins over markers and suites", "auto", type=_device_arg,
        metavar="DEVICE")  # fmt: skip
    add("--saliency-seed", "saliency_seed", "seed of every audit (default 0)", "0", type=int,
        metavar="N")  # fmt: skip
    add("--saliency-similarity", "saliency_similarity", "similarity metric of every check that "
        "compares maps (default: each check's own: ssim, smooth_randomization spearman_abs)",
        "", metavar="NAME")  # fmt: skip
    add("--saliency-max-similarity", "saliency_max_similarity", "default threshold in [-1, 1]: "
        "an audit passes when its similarity is at most this (default 0.5)", "0.5", type=float,
        metavar="X")  # fmt: skip
    add("--saliency-baseline", "saliency_baseline", "compare every audit's score with this "
        "baseline (written by --saliency-baseline-save); worse by more than the tolerance fails",
        "", metavar="PATH")  # fmt: skip
    add("--saliency-baseline-tolerance", "saliency_baseline_tolerance", "how much worse than "
        "the baseline a score may get, in the check's failing direction (default 0.05)",
        "0.05", metavar="X")  # fmt: skip
    add("--saliency-threads", "saliency_threads", "torch threads of each xdist worker: auto "
        "(the CPU cores / the workers), or N; a serial run keeps torch's own unless N is given",
        "auto", metavar="N")  # fmt: skip
    group.addoption("--saliency-baseline-save", dest="saliency_baseline_save", default=None,
                    metavar="PATH", help="write every audit's score to PATH at the end of the "
                    "run, as a baseline for --saliency-baseline")  # fmt: skip
    add("--saliency-report", "saliency_report", "write a report: .json, .html or .md (a "
        "summary for a pull request) by suffix; repeat for several",
        [], ini_type="paths", action="append", metavar="PATH")  # fmt: skip


@dataclass
class Settings:
    """Session-wide audit settings: CLI options win over ini keys, which win over defaults."""

    device: str = "auto"
    seed: int = 0
    similarity: str | None = None  # None: each check's own default metric
    max_similarity: float = 0.5
    reports: list[Path] = field(default_factory=list)
    device_from_cli: bool = False
    baseline: Path | None = None  # compare with this baseline
    baseline_tolerance: float = 0.05
    baseline_save: Path | None = None  # write the run's baseline here
    threads: int | None = None  # torch threads to set in this process (None: leave them)
    worker: int | None = None  # this xdist worker's number (gw3 -> 3)
    _resolved: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: pytest.Config) -> Settings:
        def value(name: str) -> Any:
            cli = config.getoption(name)
            return (cli, True) if cli is not None else (config.getini(name), False)

        device, from_cli = value("saliency_device")
        device = str(device).strip()
        from .devices import CHOICES, valid

        if not valid(device):
            raise pytest.UsageError(f"saliency_device = {device!r}: expected {CHOICES}")
        from .validate import problem

        seed_value = value("saliency_seed")[0]
        try:
            seed = int(seed_value)
        except ValueError:
            seed = seed_value
        if problem("seed", seed):
            raise pytest.UsageError(f"saliency_seed = {seed_value!r}: {problem('seed', seed)}")
        limit_value = value("saliency_max_similarity")[0]
        try:
            limit = float(limit_value)
        except ValueError:
            limit = limit_value
        if problem("max_similarity", limit):
            raise pytest.UsageError(
                f"saliency_max_similarity = {limit_value!r}: {problem('max_similarity', limit)}"
            )
        cli_reports = config.getoption("saliency_report")
        if cli_reports:  # relative to the invocation directory, as --junitxml
            base = config.invocation_params.dir
            reports = [base / Path(p).expanduser() for p in cli_reports]
        else:  # the "paths" ini type is already relative to the ini file
            reports = [Path(p) for p in config.getini("saliency_report")]
        from .reporters import formats

        suffixes = formats(config)
        for path in reports:
            if path.suffix.lower() not in suffixes:
                raise pytest.UsageError(
                    f"--saliency-report {path}: the suffix must be one of "
                    f"{', '.join(suffixes)} (repeat the option to write several)"
                )
        reports = list(dict.fromkeys(path.resolve() for path in reports))
        similarity = str(value("saliency_similarity")[0] or "").strip() or None
        from .baseline import tolerance_value

        base_dir = config.invocation_params.dir
        ini_dir = config.inipath.parent if config.inipath else config.rootpath
        baseline, baseline_from_cli = value("saliency_baseline")
        baseline = str(baseline or "").strip()
        baseline_path = None
        if baseline:
            baseline_path = ((base_dir if baseline_from_cli else ini_dir) / baseline).resolve()
        raw_tolerance, tolerance_from_cli = value("saliency_baseline_tolerance")
        tolerance = tolerance_value(
            raw_tolerance,
            "--saliency-baseline-tolerance"
            if tolerance_from_cli
            else "saliency_baseline_tolerance",
        )
        save = config.getoption("saliency_baseline_save")
        save_path = (base_dir / Path(save).expanduser()).resolve() if save else None
        worker_input = getattr(config, "workerinput", None)
        worker = None
        if worker_input is not None:
            digits = re.sub(r"\D", "", str(worker_input.get("workerid", "")))
            worker = int(digits) if digits else 0
        threads = _threads(value("saliency_threads"), worker_input)
        return cls(device, seed, similarity, limit, reports, from_cli, baseline_path, tolerance,
                   save_path, threads, worker)  # fmt: skip

    def apply_threads(self) -> None:
        """Set torch's thread count once, in a process that runs audits (an xdist worker by
        default; anywhere with ``--saliency-threads N``)."""
        if self.threads is not None:
            import torch

            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
            self.threads = None

    def torch_device(self) -> torch.device:
        """The device audits run on; auto is cuda when available. UsageError for a device
        this machine does not have."""
        if self._resolved is None:
            from .devices import resolve_device

            try:
                self._resolved = resolve_device(self.device, worker=self.worker)
            except SaliencyError as exc:
                flag = "--saliency-device" if self.device_from_cli else "saliency_device ="
                raise pytest.UsageError(f"{flag} {exc}") from None
        return self._resolved

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "seed": self.seed,
            "similarity": self.similarity,
            "max_similarity": self.max_similarity,
            "reports": [str(p) for p in self.reports],
            "baseline": None if self.baseline is None else str(self.baseline),
            "baseline_tolerance": self.baseline_tolerance,
        }


def _threads(given: tuple[Any, bool], worker_input: Any) -> int | None:
    """The thread count ``--saliency-threads`` / ``saliency_threads`` asks for here."""
    import os

    raw, from_cli = given
    text = str(raw).strip().lower()
    where = "--saliency-threads" if from_cli else "saliency_threads ="
    if text in ("", "auto"):
        if worker_input is None:
            return None  # a serial run keeps torch's own
        count = int(worker_input.get("workercount", 1) or 1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return max(1, (cores or os.cpu_count() or 1) // max(count, 1))
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise pytest.UsageError(f"{where} {raw!r}: expected auto or an integer >= 1")
    return threads


def check_similarity(name: str) -> None:
    """A UsageError naming the valid metrics when ``name`` is not one (imports torch)."""
    from .validate import problem

    found = problem("similarity", name)
    if found is not None:
        raise pytest.UsageError(f"--saliency-similarity / saliency_similarity {name!r}: {found}")


class SaliencySession:
    """Every audit of the run (records, JSON-able) and the settings they ran with."""

    def __init__(self, settings: Settings, config: pytest.Config | None = None) -> None:
        self.settings = settings
        self.config = config
        self.order: dict[str, int] = {}  # node id -> position in the collection
        self.records: list[dict] = []
        self.baseline = None
        self._keyed: dict[str, int] = {}  # baseline keys made so far, by node id and check
        if settings.baseline is not None:
            from .baseline import Baseline

            self.baseline = Baseline(settings.baseline, settings.baseline_tolerance)
        self.written: list[Path] = []
        self.written_baseline: Path | None = None
        self.crashed: list[str] = []  # tests whose xdist worker crashed while running them
        self.calling: str | None = None  # the test whose call phase runs now
        # error rows its call made, with their junit properties: dropped if the test passes
        self.call_errors: list[tuple[dict, list]] = []
        self.errors: list[str] = []

    def record(
        self,
        nodeid: str,
        result: AuditResult,
        *,
        threshold: float,
        confidence: bool = False,
        expected: str = "pass",
        method_id: str | None = None,
        source: str = "python",
        device: str | None = None,
        model: str | None = None,
    ) -> dict:
        """Build the record of ``result`` (see :func:`report.make_record`), keep it, return it."""
        rec = report.make_record(
            nodeid,
            result,
            threshold=threshold,
            confidence=confidence,
            expected=expected,
            method_id=method_id,
            device=device or str(self.settings.torch_device()),
            source=source,
            model=model,
        )
        if any(path.suffix.lower() == ".html" for path in self.settings.reports):
            from .html import figures

            rec["figures"] = figures(result)
        return self._keep(rec)

    def _keep(self, rec: dict) -> dict:
        from .baseline import key_of

        if self.baseline is not None and not rec.get("error"):  # an error has no score
            self.baseline.compare(key_of(rec, self._keyed), rec)
        if self.config is not None:
            self.config.hook.pytest_saliency_record(record=rec, config=self.config)
        self.records.append(rec)
        return rec

    def record_error(self, nodeid: str, exc: BaseException, **fields: Any) -> dict:
        """Keep the row of an audit that raised (see :func:`report.make_error_record`)."""
        fields.setdefault("device", str(self.settings.torch_device()))
        return self._keep(report.make_error_record(nodeid, exc, **fields))

    def sorted_records(self) -> list[dict]:
        """Records in collection order (xdist's controller has it from the workers), so
        serial and xdist runs give the same reports."""
        return report.in_order(self.records, self.order)

    def meta(self) -> dict:
        from . import __version__

        settings = self.settings
        return {
            "plugin": "pytest-saliency",
            "version": __version__,
            "torch": report.torch_version(),
            "pytest": pytest.__version__,
            "settings": settings.as_dict(),
            "seed": settings.seed,
            "device": str(settings.torch_device()),
            **({"missing_records": list(self.crashed)} if self.crashed else {}),
            **(
                {}
                if self.baseline is None
                else {
                    "baseline": {
                        "path": str(self.baseline.path),
                        "tolerance": self.baseline.tolerance,
                        "gone": self.baseline.gone(self.sorted_records()),
                    }
                }
            ),  # fmt: skip
        }

    def write_baseline(self) -> None:
        from .baseline import save

        path = self.settings.baseline_save
        try:
            save(self.sorted_records(), path, self.meta())
            self.written_baseline = path
        except OSError as exc:
            self.errors.append(f"could not write the saliency baseline {path}: {exc}")

    def baseline_summary(self) -> list[str]:
        """What the comparison with the baseline found, for the terminal."""
        if self.baseline is None:
            return []
        records = self.sorted_records()
        compared = [r for r in records if r.get("baseline")]
        worse = [r for r in compared if (r["baseline"].get("worse_by") or 0) > 0]
        regressed = [r for r in compared if r["baseline"].get("regressed")]
        new = [r for r in records if "baseline" in r and r["baseline"] is None]
        gone = self.baseline.gone(records)
        lines = [
            f"saliency baseline {self.baseline.path}: {len(compared)} compared, {len(worse)} "
            f"worse ({len(regressed)} by more than {self.baseline.tolerance:g}), {len(new)} new, "
            f"{len(gone)} gone"
        ]
        lines += [f"  worse: {r['nodeid']} ({r['check']}) {r['baseline']['score']:.3f} -> "
                  f"{r['score']:.3f}" for r in regressed[:10]]  # fmt: skip
        lines += [f"  new: {r['nodeid']} ({r['check']})" for r in new[:5]]
        lines += [f"  gone: {key}" for key in gone[:5]]
        return lines

    def write_reports(self) -> None:
        from .reporters import formats

        records, meta = self.sorted_records(), self.meta()
        writers = formats(self.config) if self.config is not None else {}
        for path in self.settings.reports:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                writers[path.suffix.lower()](records, path, meta)
                self.written.append(path)
            except OSError as exc:
                self.errors.append(f"could not write the saliency report {path}: {exc}")
            except Exception as exc:  # a user's writer: its error, named, not an INTERNALERROR
                self.errors.append(f"the {path.suffix} writer failed on {path}: {exc!r}")


SESSION_KEY = pytest.StashKey[SaliencySession]()
# xdist's --dist loadgroup appends "@<group>" to the ids it schedules (with pytest < 9.2);
# a "@" inside a parameter id ("test[a@b]") is followed by "]" and stays.
_GROUP_SUFFIX = re.compile(r"@[^\[\]@:/]*$")


def item_nodeid(item: pytest.Item) -> str:
    """``item``'s id as a serial run names it: without the ``@group`` suffix xdist's
    loadgroup gives an item with ``xdist_group`` marks (their names, sorted, joined by _)."""
    nodeid = item.nodeid
    marks = [str(m.args[0] if m.args else m.kwargs.get("name", "default"))
             for m in item.iter_markers("xdist_group")]  # fmt: skip
    if not marks:
        return nodeid
    # pytest-xdist >= 3.7 joins every group's name; older ones take the closest mark's
    for suffix in ("@" + "_".join(sorted(set(marks))), "@" + marks[0]):
        if nodeid.endswith(suffix):
            return nodeid[: -len(suffix)]
    return nodeid


def plain_nodeid(nodeid: str, config: pytest.Config) -> str:
    """A node id the xdist controller got (a collected id, a crash report's) without the
    ``@group`` suffix, which only ``--dist loadgroup`` adds."""
    if getattr(config.option, "dist", None) != "loadgroup":
        return nodeid
    return _GROUP_SUFFIX.sub("", nodeid)


def get_session(config: pytest.Config) -> SaliencySession:
    """The run's :class:`SaliencySession` (created in ``pytest_configure``)."""
    return config.stash[SESSION_KEY]


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    settings = Settings.from_config(config)
    if settings.device != "auto":
        settings.torch_device()  # fail now, as a usage error, not in every test
    if settings.similarity is not None:
        check_similarity(settings.similarity)
    state = config.stash[SESSION_KEY] = SaliencySession(settings, config)
    if not is_worker(config):
        config.pluginmanager.register(_Controller(state), "saliency-controller")


def pytest_addhooks(pluginmanager: Any) -> None:
    from . import hooks

    pluginmanager.add_hookspecs(hooks)


def pytest_collection_finish(session: pytest.Session) -> None:
    state = session.config.stash.get(SESSION_KEY, None)
    if state is not None and not state.order:
        state.order = {item_nodeid(item): i for i, item in enumerate(session.items)}


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Tell each worker the scheduling mode (xdist resets it to "no" there): suites share
    passes on a worker only when all of a model's items come to it."""
    node.workerinput["saliency_dist"] = node.config.getvalue("dist")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """The controller collects nothing itself: the first worker's collection gives the
    order of the reports."""
    state = node.config.stash.get(SESSION_KEY, None)
    if state is not None and not state.order:
        state.order = {plain_nodeid(nodeid, node.config): i for i, nodeid in enumerate(ids)}


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    name, suffix = file_path.name, file_path.suffix
    if suffix in (".yaml", ".yml") and (
        name.startswith("saliency_") or name[: -len(suffix)].endswith(".saliency")
    ):
        from .suite import collect_file

        return collect_file(parent, file_path)
    return None


# -- methods as parameters ------------------------------------------------------------------


def split_method(spec: object) -> tuple[str, dict, str | None]:
    """``"name"`` or ``{"name": ..., "id": ..., **options}`` -> (name, options with the layer,
    id or None)."""
    parsed = parse_method(spec)
    layer = {} if parsed.layer is None else {"layer": parsed.layer}
    return parsed.name, {**parsed.options, **layer}, parsed.id


def marker_kwargs(node: pytest.Item) -> dict[str, Any]:
    """The kwargs of every ``saliency`` mark on ``node``, the closest winning per key (a
    module's ``methods`` and a test's ``max_similarity`` combine). Positional args are errors."""
    merged: dict[str, Any] = {}
    for mark in node.iter_markers("saliency"):
        if mark.args:
            raise SaliencyError(
                f"@pytest.mark.saliency takes keyword arguments only, got {mark.args!r}; "
                "write @pytest.mark.saliency(methods=[...])"
            )
        for key, value in mark.kwargs.items():
            merged.setdefault(key, value)
    return merged


def _ours(metafunc: pytest.Metafunc, name: str) -> bool:
    """Whether fixture ``name`` resolves to this plugin's, not to one the user defined under
    the same name (a conftest's ``saliency_method`` is theirs to parametrize)."""
    defs = getattr(metafunc, "_arg2fixturedefs", {}).get(name)
    if not defs:
        return True
    func = getattr(defs[-1], "func", None)
    return getattr(func, "__module__", __name__) == __name__


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "saliency_method" not in metafunc.fixturenames or not _ours(metafunc, "saliency_method"):
        return
    where = metafunc.definition.nodeid
    try:
        methods = marker_kwargs(metafunc.definition).get("methods")
    except SaliencyError as exc:
        pytest.fail(f"{where}: {exc}", pytrace=False)
    if not methods:
        pytest.fail(
            f"{where} uses the saliency_method fixture but has no methods to run: mark it with "
            "@pytest.mark.saliency(methods=['gradient', {'name': 'gradcam', ...}])",
            pytrace=False,
        )
    if isinstance(methods, (str, Mapping)):
        methods = [methods]
    ids: list[str] = []
    for spec in methods:
        try:
            ids.append(method_id(spec, validate=True))
        except SaliencyError as exc:
            pytest.fail(f"{where}: @pytest.mark.saliency(methods=...): {exc}", pytrace=False)
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        pytest.fail(
            f"{where}: @pytest.mark.saliency(methods=...) has duplicate ids {duplicates}; "
            "give one of them an explicit 'id'",
            pytrace=False,
        )
    metafunc.parametrize("saliency_method", list(methods), ids=ids, indirect=True)


# -- fixtures -------------------------------------------------------------------------------


class Auditor:
    """The ``saliency`` fixture: audits bound to the run's settings and the test's marker.

    Every audit result is recorded for the terminal table and the reports, tagged with the
    test's node id, and added to the test's ``user_properties`` (so ``--junitxml`` has it).
    """

    def __init__(self, session: SaliencySession, node: pytest.Item, **marker: Any) -> None:
        settings = session.settings
        self._session = session
        self._node = node
        self.seed: int = marker.get("seed", settings.seed)
        # None: each check's own default metric
        self.similarity: str | None = marker.get("similarity", settings.similarity)
        self.max_similarity: float = marker.get("max_similarity", settings.max_similarity)
        self.min_rise: float | None = marker.get("min_rise")
        self.confidence: bool = marker.get("confidence", False)
        self.batch_size: int | None = marker.get("batch_size")
        # What the fixture's calls explain unless a call says otherwise (None: class logits).
        self.target: Any = marker.get("target")
        self.output: Any = marker.get("output")
        if self.output is not None:
            from .engine.targets import Output

            Output(self.output)  # a bad selector fails the test here, located
        from .validate import SHARED, setting

        for key in SHARED:  # the marker's values, checked where they were written
            if key in marker and not (key in ("min_rise", "similarity") and marker[key] is None):
                setting(key, marker[key], f"@pytest.mark.saliency({key}=...)")

    @property
    def device(self) -> torch.device:
        return self._session.settings.torch_device()

    def _place(self, model: Any, inputs: Any) -> tuple[Any, Any]:
        """Model and inputs on the audit device; a moved deepcopy, never the user's model."""
        import torch

        device = self.device
        tensors = (
            [*model.parameters(), *model.buffers()] if isinstance(model, torch.nn.Module) else []
        )
        if any(t.device != device for t in tensors):
            model = copy.deepcopy(model).to(device)
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.to(device)
        return model, inputs

    def explain(self, model: Any, inputs: Any, method: Any, **kw: Any) -> torch.Tensor:
        """``pytest_saliency.explain`` on the audit device; maps on that device."""
        from .explainer import explain

        name, options, _ = split_method(method)
        model, inputs = self._place(model, inputs)
        kw.setdefault("batch_size", self.batch_size)
        kw.setdefault("target", self.target)
        kw.setdefault("output", self.output)
        return explain(model, inputs, name, **{**options, **kw})

    def audit(self, check: str, *args: Any, confidence: bool | None = None, **kw: Any) -> Any:
        """Run and record the check called ``check`` (see ``pytest_saliency.checks()``):
        ``saliency.audit("efficient_randomization", model, inputs, method, min_rise=0.2)``.
        The arguments are the check's API function's; its threshold (``max_similarity`` or
        ``min_rise``) defaults to the marker's, then the run's, then the check's."""
        return self._audit(check, args, confidence, kw)[0]

    def _audit(self, name: str, args: tuple, confidence: bool | None, kw: dict):
        from .checks.base import _check_method_keywords, api, get_check

        check = get_check(name)
        if len(args) != len(check.models) + 2:
            names = ", ".join([*check.models, "inputs", "method"])
            raise SaliencyError(
                f"saliency.{check.name}() takes {len(check.models) + 2} positional arguments "
                f"({names}), got {len(args)}"
            )
        key = check.threshold.key
        other = {"max_similarity", "min_rise"} - {key}
        given = [k for k in other if k in kw and kw[k] is not None]
        if given:
            raise SaliencyError(
                f"{check.name} passes by {key} ({check.threshold.help}), not by {given[0]}; "
                f"give {key}=..."
            )
        for k in other:
            kw.pop(k, None)
        threshold = kw.pop(key, None)
        if threshold is None:
            threshold = self.max_similarity if key == "max_similarity" else self.min_rise
        if threshold is None:
            threshold = check.threshold.default
        threshold = check.threshold.check(threshold, key)
        if confidence is not None:
            from .validate import setting

            setting("confidence", confidence, f"saliency.{check.name}(confidence=...)")
        confidence = self.confidence if confidence is None else confidence
        models, (inputs, method) = list(args[:-2]), args[-2:]
        name_, options, given_id = split_method(method)
        ident = given_id if given_id is not None else method_id(method)
        defaults = {"seed": self.seed, "batch_size": self.batch_size, "target": self.target,
                    "output": self.output}  # fmt: skip
        if check.similarity:
            defaults["similarity"] = self.similarity or check.similarity
        # The method goes as a one-item list of its mapping, so that its own options (a
        # smoothgrad's seed) never mix with the check's keywords of the same name.
        own = {*(o.name for o in check.options), "similarity", "seed", "batch_size", "target",
               "output"}  # fmt: skip
        given = {k: v for k, v in kw.items() if k not in own and k != "layer"}
        _check_method_keywords(check, name_, given)  # a typo of a check option says so
        spec = {"name": name_, **options, **{k: v for k, v in kw.items() if k not in own}}
        kw = {**defaults, **{k: v for k, v in kw.items() if k in own}}
        placed = [self._place(m, None)[0] for m in models]
        if len(models) > 1 and models[1] is models[0]:
            placed[1] = placed[0]  # the check refuses a twin that is the model: keep it so
        _, inputs = self._place(None, inputs)
        from .progress import listening

        try:
            with listening(Progress(self._node.config, f"{self._node.nodeid} :: {check.name}")):
                result = api(check)(*placed, inputs, [spec], **kw)[0]
        except Exception as exc:  # a row in the reports too, then the test's error as raised
            rec = self._session.record_error(
                item_nodeid(self._node), exc, check=check.name, method=name_, method_id=ident,
                options=options, threshold=threshold, confidence=confidence,
                expected=_expected_refusal(self._node, exc), seed=kw.get("seed"),
                settings={k: v for k, v in kw.items() if k != "seed"},
            )  # fmt: skip
            props = junit_properties(rec)
            self._node.user_properties.extend(props)
            if self._session.calling == item_nodeid(self._node):
                self._session.call_errors.append((rec, props))
            raise
        rec = self._session.record(
            item_nodeid(self._node),
            result,
            threshold=threshold,
            confidence=confidence,
            method_id=ident,
            expected="fail" if _expects_failure(self._node) else "pass",
        )
        self._node.user_properties.extend(junit_properties(rec))
        return result, rec

    def _asserting(self, name: str, args: tuple, confidence: bool | None, kw: dict):
        __tracebackhide__ = True
        result, rec = self._audit(name, args, confidence, kw)
        if not rec["passed"] or rec.get("regressed"):
            raise AssertionError(report.format_failure(rec))
        return result

    def __getattr__(self, attr: str) -> Any:
        """``saliency.<check>(...)`` runs and records a check; ``saliency.assert_...(...)``
        also fails the test (with a table) when the check does not pass."""
        if attr.startswith("_"):
            raise AttributeError(attr)
        from .checks.base import checks, get_check

        for name in checks():
            check = get_check(name)
            if attr == name:

                def run(*args: Any, confidence: bool | None = None, _name: str = name,
                        **kw: Any) -> Any:  # fmt: skip
                    return self._audit(_name, args, confidence, kw)[0]

                run.__doc__ = f"Run and record ``pytest_saliency.{name}``; returns its result."
                return run
            if attr == check.assert_name:

                def asserting(*args: Any, confidence: bool | None = None, _name: str = name,
                              **kw: Any) -> Any:  # fmt: skip
                    __tracebackhide__ = True
                    return self._asserting(_name, args, confidence, kw)

                asserting.__doc__ = (
                    f"Run and record ``pytest_saliency.{name}``; fail the test when it does not "
                    "pass."
                )
                return asserting
        raise AttributeError(
            f"the saliency fixture has no {attr!r}; it has explain, audit, the checks "
            f"({', '.join(checks())}) and their assert_* helpers "
            f"({', '.join(get_check(n).assert_name for n in checks())})"
        )

    def __dir__(self) -> list[str]:
        from .checks.base import checks, get_check

        names = [n for c in checks() for n in (c, get_check(c).assert_name)]
        return sorted({*super().__dir__(), *names})


def junit_properties(record: dict) -> list[tuple[str, Any]]:
    """The junit ``<property>`` s of an audit (fixture tests and suite items alike)."""
    props = [
        ("saliency_check", record["check"]),
        ("saliency_score", record.get("score")),
        ("saliency_threshold", record["threshold"]),
        ("saliency_verdict", record["verdict"]),
    ]
    props += [(f"saliency_control_{k}", v) for k, v in (record.get("controls") or {}).items()]
    if record.get("error"):
        props.append(("saliency_error", report.error_text(record)))
    return props


def _xfail(node: pytest.Item) -> Any:
    """pytest's own reading of the test's xfail marks (conditions evaluated, ``--runxfail``
    honoured): an object with ``raises``, or None when the test is not expected to fail."""
    if getattr(node.config.option, "runxfail", False):
        return None
    if not node.config.pluginmanager.hasplugin("skipping"):  # -p no:skipping: no xfail
        return None
    try:
        from _pytest.skipping import evaluate_xfail_marks, xfailed_key
    except ImportError:  # pragma: no cover - a pytest without it: read the marks plainly
        marks = [m for m in node.iter_markers("xfail") if not m.args or m.args[0] is True]
        return marks and type("Xfail", (), {"raises": marks[0].kwargs.get("raises")})()
    found = node.stash.get(xfailed_key, None)
    return evaluate_xfail_marks(node) if found is None else found


def _expects_failure(node: pytest.Item) -> bool:
    """Whether pytest expects the test to fail with an ``assert_*`` helper's AssertionError
    (an xfail mark whose condition holds and whose ``raises``, if any, takes it), so a
    failing audit shows as an expected failure in the table, as pytest reports the test."""
    expected = _xfail(node)
    raises = getattr(expected, "raises", None)
    if not expected:
        return False
    return raises is None or issubclass(AssertionError, raises)


def _expected_refusal(node: pytest.Item, exc: BaseException) -> str:
    """``"error"`` when the test is expected to fail with ``exc`` (its xfail's ``raises``, or
    any) and ``exc`` is a refusal, so the row says ``refused`` as pytest xfails the test;
    else ``"pass"``."""
    from .errors import refusal_kind

    expected = _xfail(node)
    if not expected or refusal_kind(exc) is None:
        return "pass"
    raises = getattr(expected, "raises", None)
    return "error" if raises is None or isinstance(exc, raises) else "pass"


@pytest.fixture
def saliency(request: pytest.FixtureRequest) -> Auditor:
    """An auditor bound to the run's device, seed, metric and threshold (marker kwargs win)."""
    kwargs = marker_kwargs(request.node)
    for key in kwargs:
        if key not in MARKER_KEYS:
            raise SaliencyError(
                f"@pytest.mark.saliency has no argument {key!r}; valid: {', '.join(MARKER_KEYS)} "
                "(the device is set for the whole run with --saliency-device)"
            )
    session = get_session(request.config)
    session.settings.apply_threads()
    try:
        return Auditor(session, request.node, **kwargs)
    except SaliencyError as exc:  # a marker value: its message, not the fixture's traceback
        pytest.fail(f"{request.node.nodeid}: {exc}", pytrace=False)


@pytest.fixture
def saliency_method(request: pytest.FixtureRequest) -> str | dict:
    """One method of the test's ``@pytest.mark.saliency(methods=[...])`` (a name or a dict)."""
    return copy.deepcopy(request.param)


@pytest.fixture(scope="session")
def saliency_device(pytestconfig: pytest.Config) -> torch.device:
    """The resolved audit device (``--saliency-device``)."""
    return get_session(pytestconfig).settings.torch_device()


# -- end of run: xdist, reports, terminal table ----------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    """Three things of an item's reports: error rows of audits a passing test caught are
    dropped (with their junit properties); a shared audit's time is split over its items;
    on an xdist worker, the records travel home on the report (its extra attributes reach
    the controller), so a crashed worker loses only the records of the test it crashed in."""
    outcome = yield
    state = item.config.stash.get(SESSION_KEY, None)
    if call.when == "call" and state is not None:
        report = outcome.get_result()
        if report.passed and state.call_errors:  # caught (pytest.raises): no rows
            caught = {id(rec) for rec, _ in state.call_errors}
            state.records = [r for r in state.records if id(r) not in caught]
            for prop in (p for _, props in state.call_errors for p in props):
                for where in (item.user_properties, report.user_properties):
                    if prop in where:
                        where.remove(prop)
        state.call_errors = []
    if call.when == "call" and hasattr(item, "shared_seconds"):
        # a shared audit's time, split over the items that share it (the sum stays)
        report = outcome.get_result()
        report.duration = max(0.0, report.duration - item.paid_seconds + item.shared_seconds)
    if state is not None and is_worker(item.config) and state.records:
        outcome.get_result().saliency_records = state.records
        state.records = []


PROGRESS_AFTER = 5.0  # seconds an audit runs before its first progress line
PROGRESS_EVERY = 10.0  # seconds between two lines of one audit


class Progress:
    """Listens to an audit's steps (``progress.listening``) and prints ``saliency: <what>:
    step k/n (layer), T s`` once it has run PROGRESS_AFTER seconds, then at most every
    PROGRESS_EVERY seconds; nothing under ``-q`` or on an xdist worker."""

    def __init__(self, config: pytest.Config, what: str) -> None:
        import time

        writer = config.pluginmanager.get_plugin("terminalreporter")
        quiet = (config.getoption("verbose") or 0) < 0 or is_worker(config)
        self.writer = None if quiet else writer
        self.config, self.what, self.clock = config, what, time.monotonic
        self.start, self.last = self.clock(), None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.writer is None:
            return
        now = self.clock()
        elapsed = now - self.start
        if elapsed < PROGRESS_AFTER or (self.last is not None and now - self.last < PROGRESS_EVERY):
            return
        self.last = now
        line = f"saliency: {self.what}: step {done}/{total} ({label}), {elapsed:.0f} s"
        capture = self.config.pluginmanager.getplugin("capturemanager")
        quiet = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
        with quiet:  # past pytest's capture of the test's output, to the terminal
            self.writer.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    state = item.config.stash.get(SESSION_KEY, None)
    if state is not None:
        state.calling = item_nodeid(item)
    try:
        yield
    finally:
        if state is not None:
            state.calling = None


class _Controller:
    """The hooks only the xdist controller (or a serial run) needs: the records that came
    home on the workers' reports, and the tests whose worker crashed under them."""

    def __init__(self, state: SaliencySession) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        records = getattr(report, "saliency_records", None)
        if records:
            self.state.records.extend(records)
        if report.failed and report.when == "???":  # xdist's report of a crashed worker
            self.state.crashed.append(plain_nodeid(report.nodeid, self.state.config))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    state = config.stash.get(SESSION_KEY, None)
    if state is None or is_worker(config):  # a worker's records went home on its reports
        return
    if state.settings.reports:
        state.write_reports()
    if state.settings.baseline_save is not None:
        state.write_baseline()
    if state.errors and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if is_worker(config):
        return
    state = config.stash.get(SESSION_KEY, None)
    if state is None:
        return
    try:
        if state.records:
            terminalreporter.write_sep("=", "saliency audits")
            terminalreporter.write_line(report.format_table(state.sorted_records()))
        for nodeid in state.crashed if state.records else []:
            terminalreporter.write_line(
                f"saliency: no audit record from {nodeid}: its xdist worker crashed while "
                "running it (the records of the tests it had finished are in)",
                red=True,
            )
        for line in state.baseline_summary():
            terminalreporter.write_line(line)
        for path in state.written:
            terminalreporter.write_line(f"saliency report: {path}")
        if state.written_baseline is not None:
            terminalreporter.write_line(f"saliency baseline written: {state.written_baseline}")
        for message in state.errors:
            terminalreporter.write_line(f"ERROR: {message}", red=True)
    except Exception as exc:  # the summary must never turn a run into an internal error
        terminalreporter.write_line(f"pytest-saliency: could not print the audit table: {exc!r}")
