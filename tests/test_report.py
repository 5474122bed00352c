"""The report: results.json, Markdown and a self-contained HTML page with plots, all parseable."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from device_rerank.policy import DriftTriggered
from streams.datasets.synthetic import SyntheticConfig, generate
from tandem.commands.demo import find_browser
from tandem.commands.evaluate import build_strategies, frontier
from tandem.evaluation.prequential import EvalConfig, run_prequential
from tandem.evaluation.report import table_rows, write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():  # type: ignore[no-untyped-def]
    world = generate(SyntheticConfig(events=2000, users=30, items=50, days=2.0, seed=2))
    strats = build_strategies("cloud-only,device-rerank,feature", "feature", [0.2])
    res = run_prequential(world, strats, EvalConfig(refresh_every=500, batch_size=100, n_boot=50))
    res.frontier = frontier(res, "feature")
    return res


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag == "table":
            self.tables += 1


def test_report_files_written_and_parseable(result, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths = write_report(result, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["source"] == "synthetic"
    labels = [r["label"] for r in data["results"]]
    assert {"cloud-only", "device-rerank", "feature", "feature[drift=0.2]", "popularity"} <= set(labels)
    nd = data["results"][0]["metrics"]["NDCG@10"]
    assert nd["lo"] <= nd["mean"] <= nd["hi"]
    assert len(data["frontier"]) == 2 and data["frontier"][0]["policy"] == "always"
    for name in ("ndcg_over_time.png", "bytes_vs_ndcg.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    md = paths["markdown"].read_text()
    assert "| strategy |" in md and "cloud-only" in md and "![bytes_vs_ndcg.png](bytes_vs_ndcg.png)" in md
    p = _Collect()
    p.feed(paths["html"].read_text())
    assert p.tables >= 3 and len(p.imgs) == 3
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG


def test_table_rows_have_cis_and_reference(result) -> None:  # type: ignore[no-untyped-def]
    rows = {r["strategy"]: r for r in table_rows(result)}
    assert rows["cloud-only"]["vs cloud-only"] == "ref"
    assert "[" in rows["device-rerank"]["NDCG@10 [95% CI]"]
    assert rows["device-rerank"]["vs cloud-only"].endswith("]")


def test_drift_policy_sends_less(result) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(build_strategies("feature", "feature", [0.3])[1].policy, DriftTriggered)
    always, drift = result.get("feature"), result.get("feature[drift=0.2]")
    assert drift.bytes_up < always.bytes_up


def test_cli_evaluate_synthetic(tmp_path: Path) -> None:
    from tandem.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["evaluate", "--source", "synthetic", "--events", "1500", "--strategies", "cloud-only,device-rerank", "--sweep", "", "--out", str(out), "--n-boot", "50"]
    )
    assert res.exit_code == 0, res.output
    assert "cloud-only" in res.output and (out / "report.html").is_file() and (out / "results.json").is_file()


def test_cli_evaluate_rejects_a_bad_domain_in_one_line(tmp_path: Path) -> None:
    from tandem.cli import app

    res = CliRunner().invoke(app, ["evaluate", "--source", "synthetic", "--events", "500", "--domain", "both", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--domain" in res.output and "Traceback" not in res.output


# -- the report as a browser draws it ------------------------------------------------------
#: Injected into a copy of report.html: after load, reports what the browser drew for the verdict
#: and every image (natural size, size on the page, share of saturated pixels: the data series,
#: not the grey axes and text) into a <pre id="render-check"> that --dump-dom prints.
_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(img => {
    let colored = 0;
    if (img.naturalWidth > 0) {
      const c = document.createElement('canvas');
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const ctx = c.getContext('2d');
      ctx.drawImage(img, 0, 0);
      const d = ctx.getImageData(0, 0, c.width, c.height).data;
      for (let i = 0; i < d.length; i += 4) {
        if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) colored++;
      }
      colored /= c.width * c.height;
    }
    const r = img.getBoundingClientRect();
    return {alt: img.alt, w: img.naturalWidth, h: img.naturalHeight, shown_w: r.width, shown_h: r.height, colored};
  });
  const v = document.getElementById('verdict');
  const out = document.createElement('pre');
  out.id = 'render-check';
  out.textContent = JSON.stringify({imgs, verdict: v ? v.innerText : null, verdict_h: v ? v.getBoundingClientRect().height : 0});
  document.body.appendChild(out);
});
</script>"""


def rendered(page: Path) -> dict[str, Any]:
    """What headless Chromium drew for ``page`` (a report.html), measured by ``_PROBE``."""
    import html
    import re

    from tandem.commands.demo import dump_dom

    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    dom = dump_dom(probe.as_uri(), width=1400, height=2400)
    match = re.search(r'<pre id="render-check">(.*?)</pre>', dom, re.S)
    assert match, "the probe did not run: the page never finished loading"
    return json.loads(html.unescape(match.group(1)))


needs_browser = pytest.mark.skipif(find_browser() is None, reason="chromium not installed: run infra/setup-browser.sh")


@needs_browser
def test_report_renders_verdict_and_every_plot_in_chromium(result, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from tandem.commands.demo import screenshot
    from tandem.evaluation.report import verdict

    paths = write_report(result, tmp_path)
    plots = sorted(k for k in paths if k.endswith(".png"))
    got = rendered(paths["html"])
    assert got["verdict"] == verdict(result).line() and got["verdict_h"] > 10, "the verdict is missing or not drawn"
    assert sorted(i["alt"] for i in got["imgs"]) == plots, "one <img> per plot written"
    for img in got["imgs"]:
        assert img["w"] > 200 and img["h"] > 150, f"{img['alt']}: the browser could not decode it"
        assert img["shown_w"] > 200 and img["shown_h"] > 150, f"{img['alt']}: not laid out on the page"
        assert img["colored"] > 0.002, f"{img['alt']}: no data series drawn (only grey axes and text)"  # 0.005-0.15 seen
    png = screenshot(paths["html"].as_uri(), tmp_path / "report.png", width=1400, height=2400)
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1400) and pixels.std() > 10, "the screenshot is blank"


@needs_browser
def test_render_check_catches_a_broken_plot(result, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The check above fails when a plot cannot be decoded: corrupt one image and look."""
    paths = write_report(result, tmp_path)
    page = paths["html"].read_text()
    start = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    paths["html"].write_text(page[:start] + "AAAA" + page[start + 400 :])
    sizes = sorted(i["w"] for i in rendered(paths["html"])["imgs"])
    assert sizes[0] == 0 and sizes[-1] > 200
