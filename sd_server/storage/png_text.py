"""Text chunks added to an encoded PNG without re-encoding its pixels: the A1111 ``parameters``, the XMP packet."""

import struct
import zlib

PNG_HEADER_BYTES = 8 + 25  # the signature, then the IHDR chunk (length, type, 13 bytes of data, CRC)


def with_text(png: bytes, keyword: str, text: str, international: bool = False) -> bytes:
    """``png`` with ``text`` under ``keyword`` in a chunk right after its header, as Pillow writes one: tEXt when the
    text is Latin-1 (and ``international`` is not asked for, as XMP asks), else uncompressed iTXt."""
    latin = None if international else latin_1(text)
    if latin is not None:
        chunk_type, data = b"tEXt", keyword.encode("latin-1") + b"\0" + latin
    else:
        chunk_type, data = b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    chunk = struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", zlib.crc32(chunk_type + data))
    return png[:PNG_HEADER_BYTES] + chunk + png[PNG_HEADER_BYTES:]


def latin_1(text: str) -> bytes | None:
    """``text`` in Latin-1, or None when it has characters Latin-1 lacks."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return None
