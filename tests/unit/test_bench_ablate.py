"""bench/ablate.py: every variant changes exactly the line it names in the shipped config."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from bench.ablate import CONF, VARIANTS, Variant, override

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_each_variant_changes_its_file_once(variant: Variant) -> None:
    shipped = (CONF / variant.path).read_text()
    changed = variant.render()
    assert changed != shipped
    assert variant.old in shipped
    assert variant.new in changed
    assert len(changed) - len(shipped) == len(variant.new) - len(variant.old)


def test_a_pattern_that_no_longer_matches_stops_the_run() -> None:
    gone = Variant("gone", "compression/gzip.conf", "gzip maybe;", "gzip off;", "")
    with pytest.raises(ValueError, match="'gzip maybe;' is not once in nginx/conf/compression"):
        gone.render()


def test_the_override_mounts_the_changed_copy_over_the_shipped_file(tmp_path: Path) -> None:
    compose = override(tmp_path, VARIANTS[0])
    copy = tmp_path / "conf" / VARIANTS[0].path
    assert f"- {copy}:/etc/nginx/{VARIANTS[0].path}:ro" in compose.read_text()
    assert VARIANTS[0].new in copy.read_text()
