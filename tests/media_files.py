"""Small real media files made at test time with the standard library: PNG, GIF, BMP, WAV (and a JPEG header)."""

from __future__ import annotations

import io
import math
import struct
import wave
import zlib


def png(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    """An RGB PNG with a gradient that differs by seed (so two images differ in content, not only in bytes)."""
    rows = b"".join(b"\0" + bytes(((x * 7 + y * 3 + seed * 50) % 256 if c == seed % 3 else (x + y) * 5 % 256)
                                  for x in range(width) for c in range(3)) for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims this size (its pixel data is a single row: a lie a decoder would trust)."""
    good = png(1, 1)
    return good[:16] + struct.pack(">II", width, height) + good[24:]


def wav(seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate)))
                               for i in range(int(seconds * rate))))
    return out.getvalue()


def gif(width: int = 4, height: int = 3) -> bytes:
    """A minimal one-colour GIF89a."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00" + b";")


def bmp(width: int = 2, height: int = 2) -> bytes:
    row = (b"\x00\x00\xff" * width).ljust((width * 3 + 3) & ~3, b"\0")
    pixels = row * height
    header = b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + pixels


def jpeg_frame(width: int, height: int) -> bytes:
    """The markers of a baseline JPEG of this size (SOI, APP0, SOF0, EOI); enough for a header reader."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"
