"""Suites that are not plain YAML: refused with a located error, quickly, without a traceback."""

from __future__ import annotations

import re
import time

import pytest

from pytest_saliency.suite import MAX_DEPTH, MAX_SUITE_BYTES, SuiteError, load_yaml

from .conftest import write_tinynet

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("methods: !!python/object/apply:os.system [gradient]\n",
         "s.yaml:1: methods: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not "
         "allowed"),
        ("checks: !!python/object:collections.OrderedDict {a: 1}\n", "is not allowed"),
        ("model: !!python/name:os.system\n", "s.yaml:1:8: malformed YAML"),
        ("a: &a [*a]\n", "recursive alias"),
        ("x: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n", "nests more than"),
        (BOMB, "expands to more than"),
        ("a: 1\nb: \x07\n", "s.yaml:2: the suite holds a control character ('\\x07')"),
        ("? " + "[" * 300 + "]" * 300 + "\n: 1\n", "s.yaml:1: (top level): keys must be plain"),
    ],
)  # fmt: skip
def test_unplain_yaml_is_refused(text: str, message: str) -> None:
    start = time.perf_counter()
    with pytest.raises(SuiteError, match=re.escape(message)):
        load_yaml(text, "s.yaml")
    assert time.perf_counter() - start < 5  # no expansion of the bomb


def test_very_deep_nesting_is_refused_without_a_recursion_traceback() -> None:
    with pytest.raises(SuiteError, match="nest"):
        load_yaml("x: " + "[" * 3000 + "]" * 3000 + "\n", "s.yaml")


def test_plain_yaml_with_anchors_and_merge_keys_still_loads() -> None:
    data, lines = load_yaml("base: &b {seed: 1}\nchecks:\n  output_sensitivity:\n"
                            "    <<: *b\n    against: second\n", "s.yaml")  # fmt: skip
    assert data["checks"]["output_sensitivity"] == {"seed": 1, "against": "second"}
    assert lines[("checks", "output_sensitivity", "against")] == 5


def test_non_utf8_and_oversized_suites_are_collection_errors(pytester: pytest.Pytester) -> None:
    write_tinynet(pytester)
    (pytester.path / "saliency_latin.yaml").write_bytes(
        b"model: tinynet:make_model\ninputs: tinynet:make_inputs\nmethods: [gradient]\n# caf\xe9\n"
    )
    (pytester.path / "saliency_huge.yaml").write_text("# " + "x" * MAX_SUITE_BYTES + "\n")
    result = pytester.runpytest()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "saliency_huge.yaml: the suite is * bytes; suites are limited to 1048576 bytes*",
            "saliency_latin.yaml:4: the suite is not UTF-8 (byte 0xe9 at offset *); save it as "
            "UTF-8",
        ]
    )
    assert "INTERNALERROR" not in result.stdout.str() and "Traceback" not in result.stdout.str()


def test_merge_keys_follow_yaml_precedence() -> None:
    text = (
        "a: &a {seed: 1, n: 2}\nb: &b {seed: 3, m: 4}\n"
        "c:\n  <<: [*a, *b]\n  n: 5\n"
        "d:\n  <<: *a\n  seed: 9\n"
    )
    data, lines = load_yaml(text, "s.yaml")
    assert data["c"] == {"seed": 1, "n": 5, "m": 4}  # own key wins, then the earlier source
    assert data["d"] == {"seed": 9, "n": 2}
    assert lines[("d", "seed")] == 8 and lines[("c", "n")] == 5
    with pytest.raises(SuiteError, match="s.yaml:1: x: '<<' merges mappings"):
        load_yaml("x: {<<: [1, 2]}\n", "s.yaml")
    with pytest.raises(SuiteError, match="recursive alias"):
        load_yaml("a: &a {<<: *a, x: 1}\n", "s.yaml")


# --- what the user's imports raise --------------------------------------------------------------

SUITE_OF = "model: {module}:make_model\ninputs: tinynet:make_inputs\nmethods: [gradient]\n"


def test_ctrl_c_during_a_suites_import_stops_the_run(pytester: pytest.Pytester) -> None:
    """Ctrl-C is the user's, not a collection error: the run stops, no later suite loads."""
    write_tinynet(pytester)
    pytester.makepyfile(interrupted="raise KeyboardInterrupt\n")
    pytester.makefile(".yaml", saliency_a=SUITE_OF.format(module="interrupted"))
    pytester.makefile(".yaml", saliency_b=SUITE_OF.format(module="tinynet"))
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    out = result.stdout.str()
    assert "KeyboardInterrupt" in out and "could not import" not in out
    assert "saliency_b.yaml" not in out and "passed" not in out


def test_importorskip_in_a_suites_module_skips_the_suite(pytester: pytest.Pytester) -> None:
    write_tinynet(pytester)
    pytester.makepyfile(
        needs_pkg="import pytest\npytest.importorskip('no_such_package_here')\n"
        "from tinynet import make_model\n"
    )
    pytester.makefile(".yaml", saliency_a=SUITE_OF.format(module="needs_pkg"))
    pytester.makefile(".yaml", saliency_b=SUITE_OF.format(module="tinynet"))
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=2, skipped=2)  # each item of the suite, as for a fixture
    result.stdout.fnmatch_lines(["*no_such_package_here*"])


def test_an_exit_at_import_is_a_located_error(pytester: pytest.Pytester) -> None:
    """Once in full (the first item that needs the model), then pointed at, in each item."""
    write_tinynet(pytester)
    pytester.makepyfile(exits="import sys\nsys.exit('no GPU, giving up')\n")
    pytester.makefile(".yaml", saliency_a=SUITE_OF.format(module="exits"))
    result = pytester.runpytest()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "saliency_a.yaml:1: model: could not import 'exits': SystemExit: no GPU, giving up*",
            "saliency_a.yaml:1: model: could not import 'exits': * (as for "
            "output_sensitivity[[]gradient[]], above)",
        ]
    )
    assert "Traceback" not in result.stdout.str()
