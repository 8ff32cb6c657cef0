"""The README's figures come from one command (``make figures``): its blocks are exactly what docs/figures.json
holds, so a number edited by hand, or a file regenerated without the README, fails here. (The tiny-run test in
tests/test_run_in_process.py checks docs/figures.json against what the code prints now.)"""

from __future__ import annotations

import json

from .conftest import ROOT, load_script


def test_the_readme_quotes_exactly_what_make_figures_measured(tmp_path):
    figures = load_script(ROOT / "scripts" / "figures.py", "figures")
    readme = tmp_path / "README.md"
    original = (ROOT / "README.md").read_text()
    readme.write_text(original)
    figures.rewrite_readme(json.loads((ROOT / "docs" / "figures.json").read_text()), readme)
    assert readme.read_text() == original, "README figure blocks differ from docs/figures.json: run `make figures` (or --render)"
    assert {m.group("name") for m in figures.BLOCK.finditer(original)} == {"demo", "eval", "algorithms", "scale_out"}
