"""Files a hostile (or unlucky) client sends: corrupt images and broken zips of photos, each made the way real
damage looks, for the tests that show every one is refused with a 422 naming its field."""

import io
import struct
import zipfile

from PIL import Image

from helpers import png_bytes

# Offsets inside a zip's first local file header and its central directory entry (APPNOTE 4.3.7 and 4.3.12).
LOCAL_FLAGS, LOCAL_CRC, LOCAL_SIZE = 6, 14, 22
CENTRAL_FLAGS, CENTRAL_METHOD, CENTRAL_CRC, CENTRAL_SIZE = 8, 10, 16, 24


def png_with_malformed_exif() -> bytes:
    """A PNG whose eXIf chunk holds no valid TIFF header (Pillow raises SyntaxError reading its orientation)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG", exif=b"I\xd7*\x00\x08\x00\x00\x00\x01\x00\x12\x01\xf8\x00\x01\x9b\x84\x00\x06\x00\x00\x00\x00\x00\x00\x00")
    return buffer.getvalue()


def png_with_a_broken_chunk() -> bytes:
    """A one-colour PNG whose image data and the length of the chunk after it are damaged, so that the decoder reads
    past the data into garbage (Pillow: SyntaxError, broken PNG file)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    for offset, value in ((81, 147), (121, 112), (143, 234), (149, 226)):  # two bytes of the IDAT stream; IEND's length and type
        data[offset] = value
    return bytes(data)


def dds_header() -> bytes:
    """128 bytes that open as a DirectDraw Surface with no pixel format (Pillow: NotImplementedError)."""
    return b"DDS " + struct.pack("<I", 124) + b"\0" * 120


CORRUPT_IMAGES = {
    "malformed eXIf": png_with_malformed_exif,
    "broken chunk": png_with_a_broken_chunk,
    "DDS header": dds_header,
    "truncated": lambda: png_bytes(seed=3, size=64)[:200],
}


def photo_zip(count: int = 3) -> bytes:
    """A zip of ``count`` distinct 64x64 photos, deflated."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for index in range(count):
            bundle.writestr(f"photo-{index}.png", png_bytes(seed=index, size=64))
    return buffer.getvalue()


def patched(data: bytes, local: dict[int, bytes] | None = None, central: dict[int, bytes] | None = None) -> bytes:
    """``data`` (a zip) with bytes replaced at offsets of its first member's local header and central entry."""
    patched_data = bytearray(data)
    for start, changes in ((data.index(b"PK\x03\x04"), local or {}), (data.index(b"PK\x01\x02"), central or {})):
        for offset, replacement in changes.items():
            patched_data[start + offset : start + offset + len(replacement)] = replacement
    return bytes(patched_data)


def zip_with_a_bad_crc() -> bytes:
    """The first member's CRC-32 does not match its bytes."""
    return patched(photo_zip(), {LOCAL_CRC: b"\0\0\0\0"}, {CENTRAL_CRC: b"\0\0\0\0"})


def zip_with_a_corrupt_stream() -> bytes:
    """The first member's deflate stream is garbage past its first bytes."""
    data = bytearray(photo_zip())
    start = data.index(b"PK\x03\x04") + 30 + len("photo-0.png")
    data[start + 2 : start + 40] = b"\xff" * 38
    return bytes(data)


def zip_with_an_encrypted_member() -> bytes:
    """The first member is flagged as encrypted."""
    return patched(photo_zip(), {LOCAL_FLAGS: b"\x01\0"}, {CENTRAL_FLAGS: b"\x01\0"})


def zip_with_method_6() -> bytes:
    """The first member claims compression method 6 (implode), which Python cannot unpack."""
    return patched(photo_zip(), central={CENTRAL_METHOD: b"\x06\0"})


def zip_with_a_forged_smaller_size() -> bytes:
    """The first member declares fewer bytes than it unpacks to."""
    return patched(photo_zip(), {LOCAL_SIZE: struct.pack("<I", 100)}, {CENTRAL_SIZE: struct.pack("<I", 100)})


CORRUPT_ZIPS = {
    "bad CRC": zip_with_a_bad_crc,
    "corrupt deflate stream": zip_with_a_corrupt_stream,
    "encrypted member": zip_with_an_encrypted_member,
    "compression method 6": zip_with_method_6,
    "forged smaller size": zip_with_a_forged_smaller_size,
}


def zip_bomb(inflated_bytes: int, head: bytes = b"", members: int = 1) -> bytes:
    """A small zip of ``members`` files `photo-N.png`, each inflating to ``head`` and then zeros, ``inflated_bytes``
    in all."""
    buffer = io.BytesIO()
    zeros = b"\0" * (1 << 20)
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as bundle:
        for index in range(members):
            with bundle.open(f"photo-{index}.png", "w", force_zip64=True) as member:
                member.write(head)
                left = inflated_bytes - len(head)
                while left > 0:
                    member.write(zeros[: min(left, len(zeros))])
                    left -= len(zeros)
    return buffer.getvalue()
