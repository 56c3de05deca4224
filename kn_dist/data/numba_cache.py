"""Numba compiles that every process importing FFCV would otherwise repeat, cached on disk.

`ffcv.fields.rgb_image` builds a numba typed Dict at import (IMAGE_MODES), which compiles numba's own
`_make_dict` and `_setitem` for (unicode, int64): about 3 s of CPU in every process that imports FFCV,
measured here. A study starts a fresh Ray worker for every trial segment and final, so a sweep paid it
hundreds of times. Numba does not cache these two by default; enabling its on-disk cache for them (kept in
numba's own __pycache__, or numba's user cache folder where that is read-only) makes every later import
load them in milliseconds. Numba keys its cache on the function's source and the numba version, so an
upgrade recompiles rather than loads a stale entry.

Imported by `kn_dist.data` before any FFCV import; a numba without these private names only loses the
speed-up.
"""

from __future__ import annotations


def cache_ffcv_import_compiles() -> bool:
    """Turn on numba's disk cache for the dispatchers FFCV's import compiles; whether it could."""
    try:
        from numba.typed import typeddict

        dispatchers = (typeddict._make_dict, typeddict._setitem)
        for dispatcher in dispatchers:
            dispatcher.enable_caching()
    except (ImportError, AttributeError):  # another numba layout: FFCV still works, only slower to import
        return False
    return True


CACHED = cache_ffcv_import_compiles()
