"""The Axolotl key table: every key of Axolotl's schema (the generated data file) has exactly one class."""
from __future__ import annotations

import pytest

from archtune.config import axolotl_keys as table
from archtune.config.axolotl_keys import CLASS_HONORED, CLASS_NO_EFFECT, CLASS_REFUSED, SECTIONS, key_classes, schema_keys


def test_data_file_records_the_schema_version():
    keys = schema_keys()
    # Read from a released wheel (its sha256) or a git checkout (its commit).
    assert keys["version"].startswith("v0.") and (len(keys.get("sha256", "")) == 64 or len(keys.get("commit", "")) == 40)
    assert len(keys["config"]) > 500 and len(keys["datasets"]) > 50 and len(keys["fsdp_config"]) > 10
    assert len(keys["trl"]) > 50 and set(keys["export"]) >= {"format", "outtype", "quantize", "outfile"}


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_axolotl_key_has_exactly_one_class(section):
    classes = key_classes(section)
    missing = sorted(k for k, c in classes.items() if not c)
    twice = {k: c for k, c in classes.items() if len(c) > 1}
    assert not missing, (f"{section}: Axolotl keys without a class ({len(missing)}): {missing}. Add each to the "
                         "schema (honored), NO_EFFECT or REFUSED in src/archtune/config/axolotl_keys.py")
    assert not twice, (f"{section}: keys in two classes: {twice}. A key that became a schema field must leave "
                       "NO_EFFECT/REFUSED in src/archtune/config/axolotl_keys.py")


@pytest.mark.parametrize("section", list(SECTIONS))
def test_table_names_only_real_axolotl_keys(section):
    keys, no_effect, refused = SECTIONS[section]
    stale = sorted((set(no_effect) | set(refused)) - keys - table.LEGACY_KEYS.get(section, frozenset()))
    assert not stale, f"{section}: not keys of Axolotl's schema: {stale}"


def test_every_class_2_and_3_key_has_a_reason():
    for _, no_effect, refused in SECTIONS.values():
        for key, reason in {**no_effect, **refused}.items():
            assert len(reason) > 20, key


def test_the_three_classes_all_occur():
    counts = table.class_counts()["config"]
    assert counts[CLASS_HONORED] > 50 and counts[CLASS_NO_EFFECT] > 50 and counts[CLASS_REFUSED] > 50
