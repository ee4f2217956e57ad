"""The HTML report: colormaps, figures of real audit results, and the self-contained page."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import pytest_saliency as ps
from pytest_saliency import report
from pytest_saliency.html import (
    MAX_PIXELS,
    MAX_SAMPLES,
    MAX_STEPS,
    colorize,
    figures,
    input_image,
    write_html,
)

from .conftest import write_tinynet

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "wbr", "source"}


def decode(uri: str) -> Image.Image:
    head, _, data = uri.partition(",")
    assert head in ("data:image/png;base64", "data:image/webp;base64")
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    assert image.format == head.split("/")[1].split(";")[0].upper()
    image.load()
    return image


class Page(HTMLParser):
    """Collects sections, images, links and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.classes: list[str] = []  # the class attribute of each open element
        self.summary_rows = 0
        self.svgs = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details" and "audit" in attrs.get("class", ""):
            self.sections.append(attrs["id"])
        if tag == "img":  # each distinct image is once in the script's list U
            self.images.append(attrs.get("src") or int(attrs["data-u"]))
        external = "href" in attrs and not attrs["href"].startswith("#")
        if tag in ("link", "iframe") or (tag == "script" and "src" in attrs) or external:
            self.links.append(attrs.get("href") or attrs.get("src") or tag)
        self.in_script = tag == "script"
        if tag == "svg":
            self.svgs += 1
        if tag == "tr" and any("summary" in c for c in self.classes):
            self.summary_rows += 1
        if tag not in VOID:
            self.stack.append(tag)
            self.classes.append(attrs.get("class", ""))

    def handle_data(self, data):
        if getattr(self, "in_script", False) and data.startswith("const U="):
            uris = json.loads(data[len("const U=") : data.index("];") + 1])
            self.images = [uris[i] if isinstance(i, int) else i for i in self.images]

    def handle_startendtag(self, tag, attrs):
        if tag not in VOID:  # self-closed SVG elements
            return
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()
        self.classes.pop()


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert page.stack == [], f"unclosed elements: {page.stack}"
    return page


@pytest.fixture(scope="module")
def rgb_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
        )  # fmt: skip
    return model.eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def results(rgb_model, batch):
    return {
        "sensitivity": ps.output_sensitivity(rgb_model, batch, "gradient"),
        "randomization": ps.parameter_randomization(rgb_model, batch, "gradient"),
        "gradcam": ps.output_sensitivity(rgb_model, batch, "gradcam", layer="2"),
    }


def test_diverging_colormap_is_blue_white_red_around_zero() -> None:
    rgb = colorize(np.array([[-2.0, -1.0, 0.0, 2.0]]), signed=True)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0].tolist() == [[33, 102, 172], [103, 169, 207], [247, 247, 247], [178, 24, 43]]
    # Symmetric: a non-negative map under the diverging map keeps 0 white.
    assert colorize(np.array([[0.0, 1.0]]), signed=True)[0].tolist() == [
        [247, 247, 247],
        [178, 24, 43],
    ]
    assert colorize(np.zeros((2, 2)), signed=True).reshape(-1, 3).tolist() == [[247] * 3] * 4


def test_sequential_colormap_is_min_max_scaled() -> None:
    rgb = colorize(np.array([[3.0, 5.0, 7.0]]), signed=False)
    assert rgb[0].tolist() == [[0, 0, 4], [188, 55, 84], [252, 255, 164]]
    # Halfway between two stops is the mean of their colors.
    mid = colorize(np.array([[0.0, 0.125, 1.0]]), signed=False)[0, 1]
    assert mid.tolist() == [round(87 / 2), 8, round((4 + 110) / 2)]


def test_input_images_are_min_max_gray_or_rgb_and_small() -> None:
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)).numpy()
    rgb = input_image(x)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255
    expected = np.rint((x - x.min()) / (x.max() - x.min()) * 255).transpose(1, 2, 0)
    assert np.abs(rgb.astype(int) - expected).max() <= 1
    gray = input_image(np.arange(12.0).reshape(1, 3, 4))
    assert gray.shape == (3, 4) and gray[0, 0] == 0 and gray[-1, -1] == 255
    five = input_image(np.random.default_rng(0).normal(size=(5, 4, 4)))
    assert five.shape == (4, 4)  # channel mean
    big = input_image(np.random.default_rng(0).normal(size=(1, 128, 96)))
    assert big.shape == (MAX_PIXELS, 48)
    signal = input_image(np.random.default_rng(0).normal(size=(2, 50)))
    assert signal.shape == (2, 50)


def check_images(fig: dict, size: tuple[int, int], input_mode: str) -> None:
    for row in fig["rows"]:
        image = decode(row["input"])
        assert image.size == size and image.mode == input_mode
        for cell in row["cells"]:
            image = decode(cell["image"])  # lossless WebP, or a palette PNG without WebP
            if cell["image"].startswith("data:image/webp;base64,"):
                assert image.size == size and image.mode in ("RGB", "RGBA")
            else:
                assert cell["image"].startswith("data:image/png;base64,")
                assert image.size == size and image.mode == "P"


def test_extreme_values_draw_without_a_numpy_warning() -> None:
    """Inf, NaN and values near the float64 limit: no overflow warning (an error under
    ``-W error``); inf counts as the largest finite value, NaN as 0, the scale is kept."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = input_image(np.array([[1.0, np.inf], [0.0, -np.inf]]))
        assert image.tolist() == [[255, 255], [0, 0]]
        huge = input_image(np.array([[1e308, -1e308], [0.0, 5e307]]))
        assert huge.tolist() == input_image(np.array([[1.0, -1.0], [0.0, 0.5]])).tolist()
        assert input_image(np.full((5, 4, 4), 1.7e308)).max() == 0  # flat: one gray
        signed = colorize(np.array([[1e308, -1e308, np.nan]]), True)
        assert signed.tolist() == colorize(np.array([[1.0, -1.0, 0.0]]), True).tolist()
        big = np.random.default_rng(0).random((3, 300, 300)) * 1e308
        assert input_image(big).shape == (MAX_PIXELS, MAX_PIXELS, 3)


def test_figures_of_output_sensitivity(results) -> None:
    result = results["sensitivity"]
    fig = json.loads(json.dumps(figures(result)))  # JSON-able, for xdist workers
    assert fig["columns"] == ["target class", "other class"]
    assert fig["colormap"] == "diverging"  # gradients are signed
    assert len(fig["rows"]) == MAX_SAMPLES and fig["samples_total"] == 6
    check_images(fig, (8, 8), "RGB")
    # the samples shown are the most similar ones (the verdict's worst), most similar first
    worst = sorted(range(6), key=lambda i: -float(result.scores[i]))[:MAX_SAMPLES]
    assert [row["sample"] for row in fig["rows"]] == worst
    for row in fig["rows"]:
        i = row["sample"]
        target, other = row["cells"]
        assert target["score"] is None and target["caption"] == f"class {int(result.targets[i])}"
        assert other["caption"] == f"class {int(result.others[i])}"
        assert other["score"] == pytest.approx(float(result.scores[i]))
    # GradCAM maps are non-negative: sequential colormap.
    assert figures(results["gradcam"])["colormap"] == "sequential"


def test_figures_of_parameter_randomization(results) -> None:
    result = results["randomization"]
    fig = figures(result)
    assert fig["columns"] == ["original"] + [f"{k + 1}. {n}" for k, n in enumerate(result.layers)]
    check_images(fig, (8, 8), "RGB")
    worst = result._worst()
    assert [row["sample"] for row in fig["rows"]] == sorted(
        range(len(worst)), key=lambda i: -float(worst[i])
    )[:MAX_SAMPLES]
    for row in fig["rows"]:
        i = row["sample"]
        assert row["cells"][0]["score"] is None
        for k in range(len(result.layers)):
            assert row["cells"][k + 1]["score"] == pytest.approx(float(result.scores[k, i]))


def test_many_steps_and_large_maps_are_cut_down() -> None:
    layers = [f"block{k}" for k in range(12)]
    maps = {"original": torch.rand(5, 100, 100)}
    maps.update({name: -torch.rand(5, 100, 100) for name in layers})
    scores = torch.rand(12, 5)
    scores[3, 1] = math.nan
    fake = SimpleNamespace(
        check="parameter_randomization", scores=scores, maps=maps, layers=layers,
        inputs=torch.rand(5, 1, 100, 100), targets=torch.zeros(5, dtype=torch.long),
    )  # fmt: skip
    fig = figures(fake)
    shown = [c.split(". ", 1)[1] for c in fig["columns"][1:]]
    assert len(shown) == MAX_STEPS and shown[0] == "block0" and shown[-1] == "block11"
    assert fig["steps_total"] == 12
    check_images(fig, (MAX_PIXELS, MAX_PIXELS), "L")
    assert fig["colormap"] == "diverging"


def test_page_has_a_section_per_audit_and_only_inline_images(results, tmp_path) -> None:
    records = []
    for name, result in results.items():
        record = report.make_record(
            f"test_x.py::test_{name}", result, threshold=0.5, confidence=False, expected="pass",
            method_id=result.method, device="cpu", source="python",
        )  # fmt: skip
        record["figures"] = figures(result)
        records.append(record)
    # A record without figures and with an undefined score still renders.
    records.append({**records[0], "nodeid": "t::nan", "score": None, "figures": None,
                    "degenerate": [0], "cause": "constant map", "verdict": "fail"})  # fmt: skip
    path = write_html(records, tmp_path / "sub" / "report.html", {"torch": torch.__version__})
    text = path.read_text(encoding="utf-8")
    page = parse(text)
    assert page.sections == [f"audit-{k}" for k in range(len(records))]
    assert page.summary_rows == len(records) + 1  # header + one per audit
    assert page.links == []  # self-contained: no external assets
    steps = len(results["randomization"].layers)
    # per sample: input + 2 maps (sensitivity, twice) and input + original + each step
    assert len(page.images) == MAX_SAMPLES * (3 + 3 + 2 + steps)
    for uri in page.images:
        assert max(decode(uri).size) <= MAX_PIXELS
    assert page.svgs == len(records)  # a curve or a strip per audit
    assert "t::nan" in text and "constant map" in text
    assert len(text) < 200_000


def test_html_report_from_a_suite_run(pytester: pytest.Pytester) -> None:
    write_tinynet(pytester)
    pytester.makefile(
        ".yaml",
        saliency_page="""\
        model: tinynet:make_model
        inputs: tinynet:make_inputs
        max_similarity: 1.0
        methods: [gradient, {name: gradcam, layer: "2"}]
        """,
    )
    result = pytester.runpytest("--saliency-report=out/report.html", "--saliency-report=run.json")
    result.assert_outcomes(passed=4)
    page = parse((pytester.path / "out" / "report.html").read_text(encoding="utf-8"))
    records = json.loads((pytester.path / "run.json").read_text())["records"]
    assert len(page.sections) == len(records) == 4
    per_sample = [
        3 if r["check"] == "output_sensitivity" else 2 + min(len(r["layers"]), MAX_STEPS)
        for r in records
    ]
    assert len(page.images) == MAX_SAMPLES * sum(per_sample)  # of tinynet's 4 samples
    for uri in page.images:
        assert decode(uri).size == (8, 8)


def test_the_page_opens_with_an_overview_and_collapses_the_details() -> None:
    from pytest_saliency.html import render_html

    def record(method: str, check: str, verdict: str, score: float | None) -> dict:
        return {"nodeid": f"s.yaml::{check}[{method}]", "source": "suite", "method": method,
                "method_id": method, "check": check, "score": score, "threshold": 0.5,
                "threshold_key": "max_similarity", "verdict": verdict, "similarity": "ssim",
                **({"error": {"type": "ModelError", "message": "boom"}} if verdict == "error"
                   else {})}  # fmt: skip

    records = [
        record("gradient", "output_sensitivity", "pass", 0.1),
        record("gradient", "parameter_randomization", "pass", 0.2),
        record("gradcam", "output_sensitivity", "fail", 0.9),
        record("gradcam", "parameter_randomization", "error", None),
    ]
    text = render_html(records)
    page = parse(text)
    assert page.sections == ["audit-0", "audit-1", "audit-2", "audit-3"]
    assert "<h2>Needs attention (2)</h2>" in text
    attention = text[text.index("Needs attention") : text.index('<table class="overview">')]
    assert 'href="#audit-2"' in attention and 'href="#audit-3"' in attention
    assert 'href="#audit-0"' not in attention
    overview = text[text.index('<table class="overview">') : text.index("</table>")]
    assert overview.index("<th>gradcam</th>") < overview.index("<th>gradient</th>")  # worst first
    assert '<td class="cell error"><a href="#audit-3"' in overview and ">error</a>" in overview
    assert '<td class="cell pass"><a href="#audit-0" title="pass: score 0.100' in overview
    assert text.count('<details class="audit"') == 4 and '<details class="audit" open' not in text
    assert "openTarget" in text  # a link to an audit opens it
