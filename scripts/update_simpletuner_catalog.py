#!/usr/bin/env python
"""Regenerate src/sd3tune/simpletuner/catalog.json from the installed SimpleTuner.

The catalog is what lets `sd3tune check` know every SimpleTuner option (type, choices, default, config.env key)
without importing SimpleTuner/torch. Run it after moving the SimpleTuner pin; tests/simpletuner/test_pins.py fails
while the shipped catalog and the installed SimpleTuner disagree.

Usage: uv run python scripts/update_simpletuner_catalog.py [--check]
"""

from __future__ import annotations

import sys

from sd3tune.simpletuner.catalog import CATALOG_PATH, build_catalog_from_simpletuner, dump_catalog


def main() -> int:
    fresh = dump_catalog(build_catalog_from_simpletuner())
    if "--check" in sys.argv[1:]:
        same = CATALOG_PATH.read_text() == fresh
        print("catalog is up to date" if same else f"{CATALOG_PATH} differs from the installed SimpleTuner")
        return 0 if same else 1
    CATALOG_PATH.write_text(fresh)
    print(f"wrote {CATALOG_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
