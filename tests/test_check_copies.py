"""scripts/check_copies.py: the repository's marked copies match their sources, and a drifted copy is caught."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from .conftest import ROOT

SCRIPT = ROOT / "scripts" / "check_copies.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_the_repositorys_marked_copies_match_their_sources():
    proc = _run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checked = int(proc.stdout.split()[-9])  # "<n> marked copies checked, 0 differ from their source"
    assert checked >= 2 and proc.stdout.strip().endswith("0 differ from their source")


def test_a_drifted_copy_is_reported_with_a_diff(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(textwrap.dedent('''
        class Image:
            def noise(self, num):
                """Image noise."""
                return draw(num, self.shape)
    '''))
    (package / "b.py").write_text(textwrap.dedent('''
        class Video:
            # Copied from pkg.a.Image.noise
            def noise(self, num):
                """Video noise: its own docstring is allowed."""
                return draw(num, self.shape)

            # Copied from pkg.a.Image.noise with shape->frames
            def frames_noise(self, num):
                return draw(num, self.frames)
    '''))
    proc = _run("--root", str(tmp_path), "pkg")
    assert proc.returncode == 1  # frames_noise is named differently from its source
    assert "pkg/b.py:8: differs from pkg.a.Image.noise" in proc.stdout and "-def noise(self, num):" in proc.stdout
    (package / "b.py").write_text((package / "b.py").read_text().replace("def frames_noise", "def noise"))
    assert _run("--root", str(tmp_path), "pkg").returncode == 0
    (package / "b.py").write_text((package / "b.py").read_text().replace("self.frames)", "self.frames * 2)"))
    proc = _run("--root", str(tmp_path), "pkg")
    assert proc.returncode == 1 and "+    return draw(num, self.frames * 2)" in proc.stdout
    (package / "b.py").write_text("# Copied from pkg.a.Image.missing\ndef noise():\n    pass\n")
    proc = _run("--root", str(tmp_path), "pkg")
    assert proc.returncode == 1 and "cannot find pkg.a.Image.missing" in proc.stdout
