"""Prompts and model outputs are untrusted text: planted HTML/script strings go through generate -> label ->
probe train -> trace -> heads -> report and come out escaped in report.html, never as markup."""

import json
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from refusal_cliff.cli import main

pytestmark = pytest.mark.slow

PLANTED = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</textarea><svg onload=alert(1)>",
]
CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
    None,
)


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _rewrite(path, edit):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(edit(index, record)) + "\n" for index, record in enumerate(records)))


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    """report.html of a run whose prompts, thinking and answers all carry the planted strings."""
    root = tmp_path_factory.mktemp("injection")
    for kind in ("harmful", "harmless"):
        prompts = root / f"{kind}.jsonl"
        prompts.write_text(
            "".join(
                json.dumps({"id": f"{kind}-{i}", "prompt": f"{PLANTED[i % 3]} {kind} {i}"}) + "\n"
                for i in range(9)
            )
        )
        out = root / kind
        _invoke(
            "generate",
            "--model",
            tiny_model_dir,
            "--prompts",
            prompts,
            "--max-thinking-tokens",
            8,
            "--max-answer-tokens",
            4,
            "--out",
            out,
        )

        # a random model writes noise: plant the strings in its thinking and answers, and make every
        # other harmful answer a refusal so that both groups exist
        def plant(index, record, kind=kind):
            planted = PLANTED[index % 3]
            opening = "I cannot help with that. " if kind == "harmful" and index % 2 else "Sure: "
            return {**record, "thinking": f"Let me think. {planted} Done.", "answer": f"{opening}{planted}"}

        _rewrite(out / "generations.jsonl", plant)
        _invoke("label", "--generations", out / "generations.jsonl", "--out", out)
    _invoke(
        "probe",
        "train",
        "--model",
        tiny_model_dir,
        "--harmful",
        root / "harmful",
        "--harmless",
        root / "harmless",
        "--epochs",
        2,
        "--out",
        root / "probe",
    )
    _invoke(
        "trace",
        "--model",
        tiny_model_dir,
        "--prober",
        root / "probe",
        "--generations",
        root / "harmful" / "generations.jsonl",
        "--harmless-generations",
        root / "harmless" / "generations.jsonl",
        "--out",
        root / "trace",
    )
    _invoke(
        "heads",
        "--model",
        tiny_model_dir,
        "--prober",
        root / "probe",
        "--generations",
        root / "harmful" / "generations.jsonl",
        "--group",
        "all",
        "--out",
        root / "heads",
    )
    _invoke("report", "--run", root)
    return root / "report.html"


def test_planted_strings_are_escaped(report):
    html = report.read_text(encoding="utf-8")
    for planted in PLANTED:
        assert planted not in html, f"{planted!r} is in report.html unescaped"
    for markup in ("<script>alert", "<img src=x", "<svg onload", "onerror=alert(1)>", "</textarea><svg"):
        assert markup not in html, f"{markup!r} is in report.html"
    # the texts are shown, escaped: the test would pass vacuously on a report that drops them
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# Runs first in <head>: records every dialog, then every figure's decoded width, on the <html> element.
_PROBE = """<script>
(function () {
  var dialogs = [];
  function record(kind) { return function (message) { dialogs.push(kind + ":" + message);
    document.documentElement.setAttribute("data-dialogs", JSON.stringify(dialogs)); }; }
  window.alert = record("alert"); window.confirm = record("confirm"); window.prompt = record("prompt");
  window.print = record("print");
  window.addEventListener("load", function () {
    var widths = Array.prototype.map.call(document.querySelectorAll("figure img"),
      function (img) { return img.naturalWidth; });
    document.documentElement.setAttribute("data-dialogs", JSON.stringify(dialogs));
    document.documentElement.setAttribute("data-figures", JSON.stringify(widths));
  });
})();
</script>"""


def _attribute(match):
    return json.loads(match.group(1).replace("&quot;", '"'))


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_in_a_browser_fires_no_dialog_and_decodes_every_figure(report, tmp_path):
    html = report.read_text(encoding="utf-8")
    probed = tmp_path / "report.html"
    probed.write_text(re.sub(r"<head>", "<head>" + _PROBE, html, count=1), encoding="utf-8")
    assert _PROBE in probed.read_text(encoding="utf-8")
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    root = re.search(r"<html[^>]*>", result.stdout)
    assert root, result.stdout[:500]
    dialogs = re.search(r'data-dialogs="([^"]*)"', root.group(0))
    figures = re.search(r'data-figures="([^"]*)"', root.group(0))
    assert dialogs and figures, f"the probe did not run: {root.group(0)}"
    assert _attribute(dialogs) == [], "a dialog fired"
    widths = _attribute(figures)
    assert widths and all(width > 0 for width in widths), f"figures that did not decode: {widths}"
