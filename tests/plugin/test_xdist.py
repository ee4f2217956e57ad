"""Under pytest-xdist, workers send their records home: same table and report as a serial run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xdist")

AUDITS = """
import pytest
import tinynet

@pytest.mark.saliency(methods=["gradient", "guided_backprop"], max_similarity=0.6)
def test_audit(saliency, saliency_method):
    model, x = tinynet.make_model(), tinynet.make_inputs()
    saliency.assert_output_sensitive(model, x, saliency_method)
    saliency.parameter_randomization(model, x, saliency_method)

def test_plain():
    pass
"""


def test_xdist_report_matches_serial(tiny_project: pytest.Pytester) -> None:
    tiny_project.makepyfile(AUDITS)
    runs = {}
    for name, run in (
        ("serial", tiny_project.runpytest),
        ("xdist", tiny_project.runpytest_subprocess),
    ):
        extra = ["-n", "2"] if name == "xdist" else []
        result = run("-p", "no:cacheprovider", f"--saliency-report={name}.json", *extra)
        # guided backprop keeps its maps when the class changes (Adebayo et al. 2018)
        result.assert_outcomes(passed=2, failed=1)
        text = "\n".join(result.outlines)
        assert text.count("= saliency audits =") == 1  # once, on the controller
        assert "3 audits: 2 pass, 1 fail" in text
        runs[name] = json.loads((tiny_project.path / f"{name}.json").read_text())
    assert len(runs["serial"]["records"]) == 3  # the failed assert skips one
    assert runs["xdist"]["records"] == runs["serial"]["records"]
    assert runs["xdist"]["meta"] == runs["serial"]["meta"] | {
        "settings": runs["xdist"]["meta"]["settings"]
    }


# --- scheduling, threads, crashes, GPUs -----------------------------------------------------

SHARED_SUITE = """\
model: tinynet:make_model
inputs: tinynet:make_inputs
max_similarity: 1.0
methods: [gradient, input_x_gradient, {name: gradcam, layer: "2"}, fullgrad]
checks:
  output_sensitivity: {against: random}
  parameter_randomization: {mode: cascading}
"""

# Counts the audits each process runs: one line per call, the number of methods in it.
COUNTING = """
import os
import pytest_saliency.checks.base as base

_original = base.execute

def _counted(check, models, inputs, method, kwargs):
    with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as log:
        log.write(f"{check.name} {len(method)}\\n")
    return _original(check, models, inputs, method, kwargs)

base.execute = _counted
"""


def test_loadscope_keeps_the_shared_passes(tiny_project: pytest.Pytester) -> None:
    """--dist loadscope (or loadfile) sends a model's items to one worker: the calls of a
    serial run (one per check), where plain -n 2 makes one per item. No mode audits a method
    twice, and the records are the same in all."""
    tiny_project.makefile(".yaml", saliency_shared=SHARED_SUITE)
    tiny_project.makeconftest(COUNTING)
    calls = tiny_project.path / "calls.txt"
    seen = {}
    modes = {"serial": [], "load": ["-n", "2"], "loadscope": ["-n", "2", "--dist", "loadscope"],
             "loadfile": ["-n", "2", "--dist", "loadfile"],
             "loadgroup": ["-n", "2", "--dist", "loadgroup"]}  # fmt: skip
    for name, extra in modes.items():
        calls.unlink(missing_ok=True)
        result = tiny_project.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--saliency-report={name}.json", *extra
        )
        result.assert_outcomes(passed=8)
        seen[name] = sorted(calls.read_text().splitlines())
        assert sum(int(line.split()[-1]) for line in seen[name]) == 8, (name, seen[name])
    assert seen["serial"] == ["output_sensitivity 4", "parameter_randomization 4"]
    assert seen["loadscope"] == seen["loadfile"] == seen["serial"]
    assert len(seen["load"]) == 8  # one item at a time
    # loadgroup shares only where xdist really grouped (pytest >= 9.2 and xdist <= 3.8: no)
    assert seen["loadgroup"] in (seen["serial"], seen["load"])
    records = {n: json.loads((tiny_project.path / f"{n}.json").read_text())["records"]
               for n in seen}  # fmt: skip
    for name in modes:
        assert records[name] == records["serial"], name
        assert all("@" not in r["nodeid"] for r in records[name])


THREADS = """
import torch
import tinynet

def test_threads(saliency, saliency_device):
    with open(f"threads-{torch.get_num_threads()}.txt", "w"):
        pass
"""


def test_each_worker_takes_its_share_of_the_cores(tiny_project: pytest.Pytester) -> None:
    import os

    tiny_project.makepyfile(test_threads=THREADS)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tiny_project.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert (tiny_project.path / f"threads-{max(1, cores // 2)}.txt").exists()
    tiny_project.runpytest_subprocess(
        "-n", "2", "-p", "no:cacheprovider", "--saliency-threads", "3"
    ).assert_outcomes(passed=1)
    assert (tiny_project.path / "threads-3.txt").exists()
    bad = tiny_project.runpytest_subprocess("-p", "no:cacheprovider", "--saliency-threads", "0")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--saliency-threads '0': expected auto or an integer >= 1*"])


CRASH = """
import os
import tinynet

def test_a_finished(saliency):
    saliency.output_sensitivity(tinynet.make_model(), tinynet.make_inputs(), "gradient")

def test_b_crashes(saliency):
    saliency.output_sensitivity(tinynet.make_model(), tinynet.make_inputs(), "gradient")
    os._exit(3)
"""


def test_a_crashed_worker_loses_only_the_records_of_its_test(tiny_project: pytest.Pytester):
    tiny_project.makepyfile(test_crash=CRASH)
    result = tiny_project.runpytest_subprocess(
        "-n", "1", "-p", "no:cacheprovider", "--saliency-report=r.json"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "saliency: no audit record from test_crash.py::test_b_crashes: its xdist worker "
            "crashed while running it*"
        ]  # fmt: skip
    )
    doc = json.loads((tiny_project.path / "r.json").read_text())
    assert [r["nodeid"] for r in doc["records"]] == ["test_crash.py::test_a_finished"]
    assert doc["meta"]["missing_records"] == ["test_crash.py::test_b_crashes"]


def test_auto_spreads_workers_over_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pytest_saliency.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert [resolve_device("auto", worker=w) for w in range(4)] == [
        torch.device("cuda", i) for i in (0, 1, 0, 1)
    ]
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_the_group_suffix_is_not_part_of_a_records_id() -> None:
    """Only loadgroup's suffix of the item's own groups goes; an '@' in a real id stays."""
    from types import SimpleNamespace

    from pytest_saliency.plugin import item_nodeid, plain_nodeid

    def item(nodeid, *groups):
        marks = [SimpleNamespace(args=(g,), kwargs={}) for g in groups]
        return SimpleNamespace(nodeid=nodeid, iter_markers=lambda name: iter(marks))

    assert item_nodeid(item("s.yaml::c[g]@s_yaml", "s_yaml")) == "s.yaml::c[g]"
    assert item_nodeid(item("t.py::test_a@a_b", "b", "a")) == "t.py::test_a"  # sorted, as xdist
    assert item_nodeid(item("ci@2/t.py::test_x")) == "ci@2/t.py::test_x"
    assert item_nodeid(item("t.py::TestUser@Home", "other")) == "t.py::TestUser@Home"
    grouped = SimpleNamespace(option=SimpleNamespace(dist="loadgroup"))
    plain = SimpleNamespace(option=SimpleNamespace(dist="load"))
    assert plain_nodeid("s.yaml::c[g]@s_yaml", grouped) == "s.yaml::c[g]"
    assert plain_nodeid("ci@2/t.py::test_x", grouped) == "ci@2/t.py::test_x"
    assert plain_nodeid("t.py::test_a[x@y]", grouped) == "t.py::test_a[x@y]"
    assert plain_nodeid("t.py::TestUser@Home", plain) == "t.py::TestUser@Home"
