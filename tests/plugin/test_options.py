"""Options and ini keys: defaults, precedence (CLI > ini), usage errors, marker registration."""

from __future__ import annotations

import pytest
import torch

SHOW_SETTINGS = """
from pytest_saliency.plugin import get_session

def test_show(request, saliency):
    s = get_session(request.config).settings
    print("SETTINGS", s.device, s.seed, s.similarity, s.max_similarity, s.device_from_cli)
    print("AUDITOR", saliency.seed, saliency.similarity, saliency.max_similarity)
"""


def settings_line(result: pytest.RunResult, prefix: str = "SETTINGS") -> list[str]:
    lines = [line for line in result.outlines if f"{prefix} " in line]
    assert len(lines) == 1, result.outlines
    return lines[0].split(f"{prefix} ", 1)[1].split()


def test_defaults(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    assert settings_line(result) == ["auto", "0", "None", "0.5", "False"]


def test_ini_sets_every_default(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        saliency_device = cpu
        saliency_seed = 3
        saliency_similarity = pearson
        saliency_max_similarity = 0.25
        """
    )
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    assert settings_line(result) == ["cpu", "3", "pearson", "0.25", "False"]
    assert settings_line(result, "AUDITOR") == ["3", "pearson", "0.25"]


def test_cli_wins_over_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        saliency_device = cuda:3
        saliency_seed = 3
        saliency_similarity = pearson
        saliency_max_similarity = 0.25
        """
    )
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest(
        "-s",
        "--saliency-device=cpu",
        "--saliency-seed=7",
        "--saliency-similarity=spearman",
        "--saliency-max-similarity=-0.5",
    )
    result.assert_outcomes(passed=1)
    assert settings_line(result) == ["cpu", "7", "spearman", "-0.5", "True"]


def test_marker_wins_over_cli(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.saliency(seed=11, similarity="pearson", max_similarity=0.1, confidence=True)
        def test_show(saliency):
            print("AUDITOR", saliency.seed, saliency.similarity, saliency.max_similarity,
                  saliency.confidence)
        """
    )
    result = pytester.runpytest("-s", "--saliency-seed=7", "--saliency-max-similarity=0.9")
    result.assert_outcomes(passed=1)
    assert settings_line(result, "AUDITOR") == ["11", "pearson", "0.1", "True"]


def test_unknown_marker_argument_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.saliency(max_similarty=0.1)
        def test_show(saliency):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no argument 'max_similarty'*valid: methods, max_similarity*"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_usage_error(pytester: pytest.Pytester, device: str) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(f"--saliency-device={device}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--saliency-device '{device}': CUDA is not available*"])


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_mps_without_mps_is_one_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--saliency-device=mps")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--saliency-device 'mps': *MPS*; use cpu or auto"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--saliency-report=run.xml"],
            "*--saliency-report*run.xml*must be one of .json, .html, .md*",
        ),
        (["--saliency-max-similarity=1.5"], "*saliency_max_similarity = 1.5*[[]-1, 1]*"),
        (["--saliency-seed=-2"], "*saliency_seed = -2: expected an int in [[]0, 2**63 - 1]*"),
        (
            ["--saliency-similarity=ssmi"],
            "*'ssmi': unknown similarity 'ssmi'; did you mean 'ssim'*",
        ),
        (
            ["--saliency-device=tpu"],
            "*--saliency-device*'tpu': expected auto, cpu, cuda, cuda:N or mps*",
        ),
    ],
)
def test_bad_options_are_usage_errors(pytester: pytest.Pytester, args, message) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bad_ini_values_are_usage_errors(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsaliency_device = gpu\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*saliency_device = 'gpu': expected auto, cpu, cuda, cuda:N or mps*"]
    )


def test_options_are_listed_in_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "saliency map audits (pytest-saliency):",
            "*--saliency-device=DEVICE*",
            "*--saliency-report=PATH*",
            "*saliency_max_similarity (string)*",
        ]
    )


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.saliency(max_similarity=0.3)
        def test_marked(): pass
        """
    )
    pytester.runpytest("--strict-markers").assert_outcomes(passed=1)
    pytester.runpytest("--markers").stdout.fnmatch_lines(["@pytest.mark.saliency(methods=*"])


def test_no_torch_import_without_audits(pytester: pytest.Pytester) -> None:
    """The plugin is loaded in every pytest run; a run that audits nothing must not load torch."""
    pytester.makeconftest(
        """
        import sys

        def pytest_unconfigure(config):
            print("PLUGIN", config.pluginmanager.has_plugin("saliency"))
            print("TORCH_LOADED", "torch" in sys.modules)
        """
    )
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["PLUGIN True", "TORCH_LOADED False"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("seed=-1", "@pytest.mark.saliency(seed=...): expected an int in [[]0, 2**63 - 1]*"),
        ("similarity='ssmi'", "@pytest.mark.saliency(similarity=...): unknown similarity "
                              "'ssmi'; did you mean 'ssim'*"),
        ("batch_size=0", "@pytest.mark.saliency(batch_size=...): expected a positive int*"),
        ("confidence='yes'", "@pytest.mark.saliency(confidence=...): expected true or false*"),
        ("max_similarity=2", "@pytest.mark.saliency(max_similarity=...): expected a number in "
                             "[[]-1, 1]*got 2"),
    ],
)  # fmt: skip
def test_marker_values_are_checked_where_they_were_written(
    tiny_project: pytest.Pytester, marker: str, message: str
) -> None:
    """The same check of a shared setting as the API's and a suite's (validate.py), located."""
    tiny_project.makepyfile(
        f"import pytest\n\n@pytest.mark.saliency({marker})\ndef test_x(saliency):\n    pass\n"
    )
    result = tiny_project.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"test_*.py::test_x: {message}"])
    assert "validate.py" not in result.stdout.str()  # the message, not the fixture's traceback


def test_marker_values_that_mean_the_default_or_a_boolean_are_taken(
    tiny_project: pytest.Pytester,
) -> None:
    tiny_project.makepyfile(
        "import numpy as np\nimport pytest\nimport tinynet\n\n"
        "@pytest.mark.saliency(similarity=None, confidence=np.False_, min_rise=None)\n"
        "def test_x(saliency):\n"
        "    saliency.output_sensitivity(tinynet.make_model(), tinynet.make_inputs(), 'gradient',"
        " max_similarity=1.0)\n"
    )
    tiny_project.runpytest("-p", "no:skipping").assert_outcomes(passed=1)  # no xfail plugin
