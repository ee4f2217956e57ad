"""The HTML report in a real browser: headless Chromium draws every image and opens a linked
audit. Skipped where Chromium is not installed (``apt install chromium`` on Debian)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from PIL import Image
from torch import nn

import pytest_saliency as ps
from pytest_saliency import report
from pytest_saliency.html import figures, write_html

BROWSER = next(
    (found for name in ("chromium", "chromium-browser", "google-chrome")
     if (found := shutil.which(name))), None,
)  # fmt: skip
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="headless Chromium is not installed here (Debian: apt install chromium); the page's "
    "structure is tested without a browser in test_html.py",
)


def _browser(*args: str) -> str:
    done = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=5000", *args],  # fmt: skip
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 64, 3),
    ).eval()  # fmt: skip
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    records = []
    for k, (check, method) in enumerate(
        [
            ("output_sensitivity", "gradient"),
            ("parameter_randomization", "gradient"),
            ("output_sensitivity", "guided_backprop"),
        ]  # fmt: skip
    ):
        result = getattr(ps, check)(model, x, method)
        record = report.make_record(f"t.py::test_{k}", result, threshold=0.3, method_id=method)
        record["figures"] = figures(result)
        records.append(record)
    path = write_html(records, tmp_path_factory.mktemp("html") / "report.html", {"seed": 0})
    return path, records


def test_every_image_is_drawn_after_the_script_runs(page):
    path, _ = page
    dom = _browser("--dump-dom", path.as_uri())
    images = dom.count("<img ")
    drawn = dom.count('src="data:image/png;base64,') + dom.count('src="data:image/webp;base64,')
    assert images > 10 and drawn == images
    assert dom.count('<details class="audit"') == 3


def test_a_link_to_an_audit_opens_it(page):
    path, _ = page
    dom = _browser("--dump-dom", path.as_uri() + "#audit-2")
    opened = dom[dom.index('id="audit-2"') - 40 : dom.index('id="audit-2"') + 40]
    assert "open" in opened
    assert 'id="audit-0" open' not in dom and 'open="" id="audit-0"' not in dom


def test_the_page_draws_something(page, tmp_path):
    path, _ = page
    shot = tmp_path / "shot.png"
    _browser(f"--screenshot={shot}", "--window-size=1200,900", path.as_uri())
    image = Image.open(shot).convert("L")
    low, high = image.getextrema()
    assert image.size == (1200, 900) and high - low > 100  # text and colour, not a blank page
