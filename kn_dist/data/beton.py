"""Reading and checking .beton files ourselves, before FFCV touches them.

FFCV's `Reader` trusts its input: an empty, truncated or foreign file ends in a numpy, numba or
segfaulting traceback deep inside the loader. `open_beton` parses the same layout with bounds
checks (ffcv 1.0.2 `types.py` / `writer.py`: header, field descriptors, per-sample metadata, data
pages, allocation table at the end) and raises a one-sentence `UserError` naming the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.types import (
    ALLOC_TABLE_TYPE,
    CURRENT_VERSION,
    TYPE_ID_HANDLER,
    FieldDescType,
    HeaderType,
)

from kn_dist.errors import UserError

_MIN_PAGE_SIZE = 1 << 21  # ffcv.writer.MIN_PAGE_SIZE
_MAX_FIELDS = 64


@dataclass(frozen=True)
class Beton:
    """A validated .beton: its field names/types and per-sample metadata (no image data read)."""

    path: Path
    num_samples: int
    page_size: int
    fields: dict[str, str]  # name -> FFCV field class name, in file order
    metadata: np.ndarray  # structured array, one record per sample

    def labels(self, field: str = "label") -> np.ndarray:
        """The IntField `field` of every sample, int64."""
        return np.asarray(self.metadata[field], dtype=np.int64)

    def resolutions(self, field: str = "image") -> np.ndarray:
        """(num_samples, 2) array of (height, width) of the RGBImageField `field`."""
        meta = self.metadata[field]
        return np.stack([meta["height"], meta["width"]], axis=1).astype(np.int64)


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"{str(path)!r} is not a readable FFCV .beton file: {what}")


def open_beton(path: str | Path) -> Beton:
    """Validate the layout of `path` and return its metadata; UserError naming the path otherwise."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset file {str(path)!r} does not exist; write it with `kn-dist data write`")
    if not path.is_file():
        raise UserError(f"dataset file {str(path)!r} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise _bad(path, "the file is empty")
    if size < HeaderType.itemsize:
        raise _bad(path, f"only {size} bytes, shorter than the {HeaderType.itemsize}-byte header")

    with open(path, "rb") as fh:
        head = fh.read(HeaderType.itemsize)
    header = np.frombuffer(head, dtype=HeaderType, count=1)[0]
    version, num_fields = int(header["version"]), int(header["num_fields"])
    page_size, num_samples = int(header["page_size"]), int(header["num_samples"])
    alloc_ptr = int(header["alloc_table_ptr"])
    if version != CURRENT_VERSION:
        raise _bad(path, f"format version {version}, expected {CURRENT_VERSION} (ffcv 1.0.x)")
    if not 1 <= num_fields <= _MAX_FIELDS or page_size < _MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise _bad(path, "the header is corrupt (field count or page size out of range)")

    desc_end = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if desc_end > size:
        raise _bad(path, "the file is truncated inside its field descriptors")
    descs = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    fields: dict[str, str] = {}
    handlers = []
    for desc in descs:
        handler = TYPE_ID_HANDLER.get(int(desc["type_id"]))
        raw_name = bytes(desc["name"]).split(b"\0", 1)[0]
        if handler is None or not raw_name:
            raise _bad(path, f"field type id {int(desc['type_id'])} is not a built-in FFCV field")
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise _bad(path, "a field name is not ASCII") from None
        fields[name] = handler.__name__
        handlers.append(handler.from_binary(desc["arguments"]))
    if len(fields) != num_fields:
        raise _bad(path, "two fields share a name")
    # Same layout as ffcv.types.get_metadata_type (aligned struct), but with the field names.
    meta_type = np.dtype([(n, h.metadata_type) for n, h in zip(fields, handlers, strict=True)], align=True)

    meta_end = desc_end + num_samples * meta_type.itemsize
    if not meta_end <= alloc_ptr <= size:
        raise _bad(path, "the file is truncated (its allocation table lies beyond the end)")
    if (size - alloc_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise _bad(path, "the file is truncated (partial allocation table)")
    metadata = np.fromfile(path, dtype=meta_type, count=num_samples, offset=desc_end)
    alloc = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=alloc_ptr)
    if len(alloc) and int((alloc["ptr"] + alloc["size"]).max()) > alloc_ptr:
        raise _bad(path, "an allocation points past the data region")

    for name, kind in fields.items():
        if kind != RGBImageField.__name__:
            continue
        meta = metadata[name]
        ptrs = meta["data_ptr"]
        if num_samples and (
            int(meta["mode"].max()) > 1
            or int(meta["height"].min()) == 0
            or int(meta["width"].min()) == 0
            or not np.isin(ptrs, alloc["ptr"]).all()
        ):
            raise _bad(path, f"image field {name!r} has corrupt per-sample records")
    return Beton(path=path.resolve(), num_samples=num_samples, page_size=page_size, fields=fields, metadata=metadata)


def check_image_label_fields(beton: Beton) -> None:
    """kn_dist .beton files have an RGB `image` field and an int `label` field; UserError otherwise."""
    want = {"image": RGBImageField.__name__, "label": IntField.__name__}
    for name, kind in want.items():
        if beton.fields.get(name) != kind:
            raise UserError(
                f"{str(beton.path)!r} has fields {beton.fields}; kn_dist needs 'image' ({kind} for 'image', "
                f"IntField for 'label'); write it with `kn-dist data write`"
            )
    if beton.num_samples == 0:
        raise UserError(f"{str(beton.path)!r} holds no samples")


def inspect_beton(path: str | Path) -> dict:
    """Fields, sample count, resolution, storage modes and label range of a .beton (for `kn-dist data inspect`)."""
    beton = open_beton(path)
    info: dict = {
        "path": str(beton.path),
        "num_samples": beton.num_samples,
        "fields": beton.fields,
        "size_bytes": beton.path.stat().st_size,
    }
    for name, kind in beton.fields.items():
        if kind == RGBImageField.__name__ and beton.num_samples:
            hw = beton.resolutions(name)
            modes = beton.metadata[name]["mode"]
            info[name] = {
                "min_hw": hw.min(axis=0).tolist(),
                "max_hw": hw.max(axis=0).tolist(),
                "constant_resolution": bool((hw == hw[0]).all()),
                "jpeg_samples": int((modes == 0).sum()),
                "raw_samples": int((modes == 1).sum()),
            }
        elif kind == IntField.__name__ and beton.num_samples:
            values = beton.labels(name)
            info[name] = {
                "min": int(values.min()),
                "max": int(values.max()),
                "distinct": int(len(np.unique(values))),
            }
    return info
