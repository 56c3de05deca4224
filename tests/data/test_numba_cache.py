"""FFCV's import-time numba compiles come from numba's disk cache once one process has made them
(kn_dist.data.numba_cache): read back through numba's own dispatcher statistics in fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json
import kn_dist.data  # enables the cache, then imports FFCV
import ffcv.fields.rgb_image as rgb
from numba.typed import typeddict
stats = [typeddict._make_dict.stats, typeddict._setitem.stats]
print(json.dumps({
    "hits": [sum(s.cache_hits.values()) for s in stats],
    "misses": [sum(s.cache_misses.values()) for s in stats],
    "modes": dict(rgb.IMAGE_MODES),
}))
"""


def _probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_ffcvs_import_compiles_from_disk():
    _probe()  # compiles and writes the cache if no earlier process did
    second = _probe()
    assert second["hits"] == [1, 1] and second["misses"] == [0, 0], second
    # the dict the compiled functions built is FFCV's, intact
    assert second["modes"] == {"jpg": 0, "raw": 1}
