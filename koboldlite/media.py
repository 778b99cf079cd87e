"""Images and audio a request carries: decoded from base64 or a data URI, known by their bytes, checked before
llama.cpp sees them.

Only the formats below reach libmtmd: anything else would be handed by its helper to ffmpeg from the PATH, and a
file whose header lies (a WAV that claims hours, a PNG of a billion pixels) would make it allocate what the header
says. So the header is read here first, and the sizes are capped. Every refusal is a RequestError that says what
was wrong with which item (`where`: "messages[1].content[0]", "images[0]").
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import os
import re
import struct

from .errors import RequestError


class MediaKind(enum.Enum):
    IMAGE = "image"
    AUDIO = "audio"


# Limits: a request's item, in bytes, pixels and seconds. A photo from a phone is 3-12 MB and 12-50 Mpx; the
# projector sees it resized to a few hundred pixels a side, so a larger one only costs memory to decode.
MAX_BYTES = 32 << 20
MAX_PIXELS = 64_000_000
MAX_AUDIO_SECONDS = 15 * 60
MIN_AUDIO_SECONDS = 0.1           # libmtmd aborts the process on audio of one sample

# Where a media item stands in a request's prompt text, in order: random for each process, so no client can type it.
MEDIA_MARKER = f"<__koboldlite_media_{os.urandom(8).hex()}__>"

IMAGE_FORMATS = ("jpeg", "png", "gif", "bmp")
AUDIO_FORMATS = ("wav", "mp3", "flac")


@dataclasses.dataclass(frozen=True)
class MediaItem:
    """One image or audio file, as sent, with what its header says."""
    kind: MediaKind
    format: str                  # jpeg, png, gif, bmp, wav, mp3, flac
    data: bytes
    width: int = 0               # images
    height: int = 0
    seconds: float | None = None   # audio, where the header says (WAV, FLAC); MP3 is known once decoded

    def describe(self) -> str:
        if self.kind is MediaKind.IMAGE:
            return f"{self.format} image {self.width}x{self.height}"
        return f"{self.format} audio" + (f" {self.seconds:.1f} s" if self.seconds is not None else "")


DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.ASCII)


def decode_base64(value: object, where: str) -> bytes:
    """The bytes of a base64 string, bare or as a data URI (data:image/png;base64,...)."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where}: expected a base64 string or a data: URI")
    m = DATA_URI.match(value)
    if m:
        if not m.group(3):
            raise RequestError(f"{where}: a data: URI must be base64-encoded (';base64,')")
        value = value[m.end():]
    elif re.match(r"[a-zA-Z][\w+.-]*://", value):
        raise RequestError(f"{where}: a URL was sent where the file's data was expected; this server does not "
                           f"fetch addresses it is given (send the file as base64 or a data: URI)")
    if len(value) > MAX_BYTES * 4 // 3 + 4:
        raise RequestError(f"{where}: larger than {MAX_BYTES >> 20} MiB", status=413)
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: not valid base64") from None
    if not data:
        raise RequestError(f"{where}: empty")
    return data


def sniff(data: bytes) -> tuple[MediaKind, str] | None:
    """The kind and format its first bytes say, or None for anything this server does not read."""
    if data[:3] == b"\xff\xd8\xff":
        return MediaKind.IMAGE, "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return MediaKind.IMAGE, "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return MediaKind.IMAGE, "gif"
    if data[:2] == b"BM" and len(data) >= 26:
        return MediaKind.IMAGE, "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return MediaKind.AUDIO, "wav"
    if data[:4] == b"fLaC":
        return MediaKind.AUDIO, "flac"
    if data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return MediaKind.AUDIO, "mp3"
    return None


def read_media(data: bytes, where: str, allowed: tuple[MediaKind, ...] = (MediaKind.IMAGE, MediaKind.AUDIO)
               ) -> MediaItem:
    """Know the file by its bytes and check its header; a RequestError (400, 413 or 415) names what is wrong."""
    if len(data) > MAX_BYTES:
        raise RequestError(f"{where}: larger than {MAX_BYTES >> 20} MiB", status=413)
    found = sniff(data)
    if found is None:
        readable = ", ".join((IMAGE_FORMATS if MediaKind.IMAGE in allowed else ())
                             + (AUDIO_FORMATS if MediaKind.AUDIO in allowed else ()))
        raise RequestError(f"{where}: not a file this server reads ({readable})", status=415)
    kind, fmt = found
    if kind not in allowed:
        raise RequestError(f"{where}: {kind.value} ({fmt}) where {' or '.join(k.value for k in allowed)} "
                           f"was expected", status=415)
    if kind is MediaKind.IMAGE:
        width, height = _image_size(data, fmt, where)
        if width <= 0 or height <= 0:
            raise RequestError(f"{where}: the {fmt} image says it is {width}x{height} pixels")
        if width * height > MAX_PIXELS:
            raise RequestError(f"{where}: {width}x{height} pixels is more than this server decodes "
                               f"({MAX_PIXELS // 1_000_000} megapixels)", status=413)
        return MediaItem(kind, fmt, data, width, height)
    seconds = _audio_seconds(data, fmt, where)
    if seconds is not None:
        if seconds > MAX_AUDIO_SECONDS:
            raise RequestError(f"{where}: {seconds:.0f} s of audio is more than this server takes "
                               f"({MAX_AUDIO_SECONDS // 60} minutes)", status=413)
        if seconds < MIN_AUDIO_SECONDS:
            raise RequestError(f"{where}: {seconds:.3f} s of audio is too short to hear")
    return MediaItem(kind, fmt, data, seconds=seconds)


def _truncated(where: str, fmt: str) -> RequestError:
    return RequestError(f"{where}: the {fmt} file is truncated or damaged")


def _image_size(data: bytes, fmt: str, where: str) -> tuple[int, int]:
    """Width and height from the header, and a check that the file is whole where its format ends with a mark."""
    try:
        if fmt == "png":
            if data[12:16] != b"IHDR" or not data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82"):
                raise _truncated(where, fmt)
            return struct.unpack(">II", data[16:24])
        if fmt == "gif":
            if not data.rstrip(b"\0").endswith(b";"):
                raise _truncated(where, fmt)
            return struct.unpack("<HH", data[6:10])
        if fmt == "bmp":
            width, height = struct.unpack("<ii", data[18:26])
            return width, abs(height)           # negative: stored top-down
        return _jpeg_size(data, where)
    except struct.error:
        raise _truncated(where, fmt) from None


# JPEG markers that carry a frame header (SOF0-SOF15 but DHT C4, JPG C8, DAC CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes, where: str) -> tuple[int, int]:
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise _truncated(where, "jpeg")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:                      # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    raise _truncated(where, "jpeg")


def _audio_seconds(data: bytes, fmt: str, where: str) -> float | None:
    """The length a WAV or FLAC header declares (what the decoder will allocate); None for MP3 (no header)."""
    try:
        if fmt == "wav":
            return _wav_seconds(data, where)
        if fmt == "flac":
            # STREAMINFO, the first metadata block: 20 bits of sample rate, 36 bits of total samples.
            if len(data) < 26 or data[4] & 0x7F != 0:
                raise _truncated(where, fmt)
            info = int.from_bytes(data[18:26], "big")
            rate, total = info >> 44, info & ((1 << 36) - 1)
            if rate == 0:
                raise _truncated(where, fmt)
            return total / rate if total else None      # 0: unknown length, decoded as it comes
    except struct.error:
        raise _truncated(where, fmt) from None
    return None


def _wav_seconds(data: bytes, where: str) -> float:
    i, byte_rate = 12, 0
    while i + 8 <= len(data):
        chunk, size = data[i:i + 4], struct.unpack("<I", data[i + 4:i + 8])[0]
        if chunk == b"fmt ":
            byte_rate = struct.unpack("<I", data[i + 16:i + 20])[0]
        elif chunk == b"data":
            # The decoder allocates what the header declares: one that claims more than the file holds is refused.
            if byte_rate <= 0 or size > len(data) - i - 8:
                raise _truncated(where, "wav")
            return size / byte_rate
        i += 8 + size + (size & 1)
    raise _truncated(where, "wav")
