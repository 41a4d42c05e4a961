"""CSV files from users (manifests, image lists): one reader, one-line errors that name the line.

UTF-8 with or without a byte-order mark (Excel writes one); a byte that is not UTF-8 or a row with
more fields than the header is refused with its line number instead of a traceback.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from wbc.errors import WbcError


def read_csv(path: str | Path, required: Sequence[str] = (), hint: str = "") -> tuple[list[str], list[tuple[int, dict]]]:
    """-> (column names, [(line number, {column: stripped value})]); WbcError on bad input.

    Missing trailing fields read as ''; header names are stripped.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise WbcError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the CSV "
                       "as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [c.strip() for c in next(reader)]
    except StopIteration:
        raise WbcError(f"{path}: empty file; expected a header line with {', '.join(required)}") from None
    except csv.Error as e:
        raise WbcError(f"{path}:1: malformed CSV ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise WbcError(f"{path}: missing column(s) {missing}; found {header}" + (f"; {hint}" if hint else ""))
    rows = []
    try:
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(header):
                raise WbcError(f"{path}:{line}: {len(values)} fields but the header has {len(header)} "
                               "(a comma inside a value needs quotes)")
            values = [v.strip() for v in values] + [""] * (len(header) - len(values))
            rows.append((line, dict(zip(header, values))))
    except csv.Error as e:
        raise WbcError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return header, rows
