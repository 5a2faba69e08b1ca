"""Level-file header: round trip, field map, and refusal of foreign/corrupt headers naming file and field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megacontext.tree.format import (
    FIELDS,
    HEADER_SIZE,
    Header,
    TreeFormatError,
    field_at,
    pack_header,
    unpack_header,
)

H = Header(level=1, dim=384, dtype="bfloat16", entry_count=12345, fingerprint="abcd" * 4, compressor_version="gn-v3",
           checksum_rows=256, tail_digest=bytes(range(8)))


def test_round_trip_and_size():
    raw = pack_header(H)
    assert len(raw) == HEADER_SIZE
    assert unpack_header(raw, "x") == H
    assert H.row_bytes == 384 * 2
    lod0 = Header(0, 384, "int32", 7, "f", "", checksum_rows=64, vocab_size=50_000)
    assert unpack_header(pack_header(lod0), "x").row_bytes == 32 * 4
    assert unpack_header(pack_header(lod0), "x").vocab_size == 50_000
    old = Header(2, 8, "float16", 3, "f", "v", format_version=1)  # a file written before checksums
    assert unpack_header(pack_header(old), "x") == old and old.checksum_rows == 0
    with pytest.raises(TreeFormatError, match="checksum_rows"):
        unpack_header(pack_header(Header(1, 8, "float16", 0, "f", "v")), "x")  # version 2 needs chunks


def test_fields_tile_the_header():
    covered = sorted((start, start + size) for _, start, size in FIELDS)
    assert covered[0][0] == 0 and covered[-1][1] == HEADER_SIZE
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))
    assert field_at(0) == "magic" and field_at(33) == "entry_count" and field_at(255) == "header_checksum"


@given(st.integers(0, HEADER_SIZE - 1), st.integers(1, 255))
def test_any_byte_flip_is_refused_naming_the_field(offset, xor):
    raw = bytearray(pack_header(H))
    raw[offset] ^= xor
    field = field_at(offset)
    expected = field if field in ("magic", "format_version") else "header_checksum"
    with pytest.raises(TreeFormatError) as e:
        unpack_header(bytes(raw), "/s/LOD1.ctx")
    assert e.value.field == expected and e.value.path == "/s/LOD1.ctx"
    assert "/s/LOD1.ctx" in str(e.value) and expected in str(e.value)


def test_short_and_semantic_refusals():
    with pytest.raises(TreeFormatError, match="file_size"):
        unpack_header(pack_header(H)[:100], "f")
    bad_level = Header(level=0, dim=8, dtype="float16", entry_count=0, fingerprint="", compressor_version="")
    with pytest.raises(TreeFormatError, match="dtype_code"):
        unpack_header(pack_header(bad_level), "f")
    with pytest.raises(TreeFormatError, match="dim"):
        unpack_header(pack_header(Header(1, 0, "float16", 0, "", "")), "f")


def test_overlong_text_fields_rejected_at_write():
    with pytest.raises(ValueError, match="compressor_version"):
        pack_header(Header(1, 8, "float16", 0, "f", "v" * 65))
    with pytest.raises(ValueError, match="fingerprint"):
        pack_header(Header(1, 8, "float16", 0, "f" * 33, "v"))
