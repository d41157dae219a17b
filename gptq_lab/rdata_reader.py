"""Objects from R lazy-load databases (`X.rdx` index + `X.rdb` blobs), the form in which
Debian's r-cran-* packages ship their data sets; parsed with the PyPI package `rdata`."""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptq_lab.errors import AssetMissingError


def lazy_load_db(rdx: Path, names: Sequence[str]) -> dict[str, Any]:
    """The objects `names` of an R lazy-load database (`X.rdx` index + `X.rdb` blobs).

    The index is a gzipped RDS list: `variables` maps name -> [offset, length] in the
    .rdb, `compressed` is R's compression mode. Each blob is a 4-byte big-endian
    uncompressed length, then (modes 2/3) a type byte, then the serialized object:
    mode 1 zlib; type 'Z' zlib, '2' bzip2, 'X' xz, '0' stored. rdata 1.x has no
    lazy-load reader, so we slice and decompress here and let rdata parse each object.
    """
    import numpy as np
    import rdata

    index = rdata.read_rds(rdx)
    mode = int(np.asarray(index["compressed"]).ravel()[0])
    blob = rdx.with_suffix(".rdb").read_bytes()
    variables = {str(k): v for k, v in index["variables"].items()}
    out = {}
    for name in names:
        if name not in variables:
            continue
        offset, length = (int(x) for x in variables[name])
        chunk = blob[offset : offset + length]
        size = struct.unpack(">I", chunk[:4])[0]
        if mode == 1:
            payload = zlib.decompress(chunk[4:])
        else:
            kind, body = chunk[4:5], chunk[5:]
            decode = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}
            payload = decode[kind](body) if kind in decode else body
        if len(payload) != size:
            raise AssetMissingError(
                f"{rdx.with_suffix('.rdb')}: object {name!r} is corrupt "
                f"({len(payload)} bytes, the index says {size})"
            )
        parsed = rdata.parser.parse_data(payload, extension=".rds")
        out[name] = rdata.conversion.convert(parsed)
    return out


def r_objects(root: Path, package: str, names: Sequence[str]) -> dict[str, Any]:
    """The objects `names` of R package `package`, from any lazy-load database under `root`
    (an unpacked .deb); `AssetMissingError` naming those not found."""
    found: dict[str, Any] = {}
    for rdx in sorted(root.rglob(f"{package}/**/*.rdx")):
        found.update(lazy_load_db(rdx, [n for n in names if n not in found]))
    missing = sorted(set(names) - set(found))
    if missing:
        raise AssetMissingError(f"R package {package}: objects {missing} not found under {root}")
    return found
