"""Review fixes: user mistakes in suites and markers get located, readable errors."""

from __future__ import annotations

import pytest

import pytest_saliency.suite  # noqa: F401  (loaded once, before pytester's inner runs)

from .conftest import write_tinynet

HELPERS = """
import torch
import tinynet

BATCH = tinynet.make_inputs(4)


def lazy_model():
    import lazy_helper  # a sibling module imported only when the factory runs
    return lazy_helper.make()


def single_image():
    return tinynet.make_inputs(1)[0]  # [1, 8, 8]: the batch axis is missing


def three_channels():
    return torch.randn(4, 3, 8, 8)
"""

GOOD = (
    "model: helpers:lazy_model\ninputs: helpers:BATCH\nmax_similarity: 1.0\nmethods: [gradient]\n"
)
BASE = "model: tinynet:make_model\ninputs: helpers:BATCH\n"

# name -> (suite text, the line its located error must show)
MISTAKES = {
    "rank": (
        "model: tinynet:make_model\ninputs: helpers:single_image\nmethods: [gradient]\n",
        "*saliency_rank.yaml:2: inputs: the model cannot run on helpers:single_image "
        "(shape [[]1, 8, 8]): RuntimeError: *",
    ),
    "channels": (
        "model: tinynet:make_model\ninputs: helpers:three_channels\nmethods: [gradient]\n",
        "*saliency_channels.yaml:2: inputs: the model cannot run on helpers:three_channels*",
    ),
    "targets": (
        BASE + "targets: [0, 1, 2, 5]\nmethods: [gradient]\n",
        "*saliency_targets.yaml:3: targets: class indices must be in [[]0, 2] (the model has 3 "
        "outputs), got [[]0, 1, 2, 5]",
    ),
    "maybe": (
        BASE + "methods: [gradient]\nexpect: {gradient: maybe}\n",
        "*saliency_maybe.yaml:4: expect.gradient: expected one of 'pass', 'fail', 'error', "
        "'unsupported', 'nonfinite' or {check: one of them}, got 'maybe'",
    ),
    "colon": (
        "model: tinynet.make_model\ninputs: helpers:BATCH\nmethods: [gradient]\n",
        "*saliency_colon.yaml:1: model: expected 'package.module:attribute' (did you mean "
        "'tinynet:make_model'?), got 'tinynet.make_model'",
    ),
    "tabs": (
        BASE + "methods:\n\t- gradient\n",
        "*saliency_tabs.yaml:4:1: malformed YAML:*(YAML indents with spaces, not tabs)",
    ),
    "string": (
        BASE + "methods: gradient\n",
        "*saliency_string.yaml:3: methods: expected a non-empty list*got 'gradient' "
        "(write methods: [[]gradient])",
    ),
    "empty": ("", "*saliency_empty.yaml:1: (top level): a suite is a mapping*got an empty file"),
}


def test_suite_mistakes_and_lazy_imports(pytester: pytest.Pytester) -> None:
    write_tinynet(pytester)
    pytester.makepyfile(
        helpers=HELPERS,
        lazy_helper="import tinynet\n\ndef make():\n    return tinynet.make_model()\n",
    )
    # Suites live in a subfolder, so only the suite loader puts the rootdir on sys.path.
    suites = pytester.mkdir("suites")
    (suites / "saliency_good.yaml").write_text(GOOD)
    for name, (text, _) in MISTAKES.items():
        (suites / f"saliency_{name}.yaml").write_text(text)
    result = pytester.runpytest(
        "suites", "--continue-on-collection-errors", "-p", "no:cacheprovider"
    )
    # rank, channels and targets need the model run: an error of each of their two items
    result.assert_outcomes(passed=2, errors=len(MISTAKES) + 3)
    for _, line in MISTAKES.values():
        result.stdout.fnmatch_lines([line])
    # One message for a bad expect value, not one per check.
    assert result.stdout.str().count("got 'maybe'") == 1


def test_marks_combine_and_positional_args_are_errors(pytester: pytest.Pytester) -> None:
    write_tinynet(pytester)
    pytester.makepyfile(
        test_marks="""
        import pytest
        import tinynet

        pytestmark = pytest.mark.saliency(methods=["gradient"], max_similarity=0.0)

        @pytest.mark.saliency(max_similarity=1.0)
        def test_combined(saliency, saliency_method):
            assert saliency.max_similarity == 1.0
            saliency.assert_output_sensitive(
                tinynet.make_model(), tinynet.make_inputs(2), saliency_method
            )

        @pytest.mark.saliency("gradient")
        def test_positional(saliency):
            pass
        """
    )
    result = pytester.runpytest("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_combined[[]gradient[]] PASSED*",
            "*@pytest.mark.saliency takes keyword arguments only, got ('gradient',)*",
        ]
    )
