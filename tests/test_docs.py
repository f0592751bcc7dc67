"""The README's images and local links point at files the repository holds (a clean clone has
nothing else: CI runs the suite in one)."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_readme_links_and_images_exist():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+://|#|mailto:", t)]
    assert any(t.endswith(".png") for t in local), "the README shows its figures"
    missing = [t for t in local if t and not (ROOT / t).exists()]
    assert not missing, f"README points at files the repository lacks: {missing}"
