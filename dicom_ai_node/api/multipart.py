"""A small streaming multipart/related splitter (RFC 2046 5.1, RFC 2387) for STOW-RS request bodies.

Fed chunk by chunk, it never holds more than one chunk plus a boundary's length of body in memory, so a
2 GB STOW-RS request streams to disk. It only splits: what a part's headers mean is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_CRLF = b"\r\n"
# Header blocks of DICOMweb parts are a line or two; a bigger one is not a STOW-RS client.
MAX_HEADER_BYTES = 16 * 1024
# RFC 2046: boundaries are 1-70 characters from a small set (plus space, not at the end).
_BOUNDARY_CHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")


class MultipartError(ValueError):
    """The body is not a well-formed multipart body (the message says what is wrong, for a 400)."""


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """'Multipart/Related; type="application/dicom"; boundary=abc' -> ('multipart/related', {...}).

    Type and parameter names are lower-cased (they are case-insensitive); values keep their case, quotes
    and backslash escapes removed (RFC 9110 5.6.4).
    """
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        name = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            i += 1  # closing quote
            val = "".join(chars)
            end = rest.find(";", i)
            i = n if end < 0 else end
        else:
            end = rest.find(";", i)
            end = n if end < 0 else end
            val = rest[i:end].strip()
            i = end
        if name:
            params[name] = val
    return media.strip().lower(), params


def check_boundary(boundary: str) -> bytes:
    raw = boundary.encode("latin-1", errors="replace")
    if not 1 <= len(raw) <= 70 or raw.endswith(b" ") or not set(raw) <= _BOUNDARY_CHARS:
        raise MultipartError("the multipart boundary must be 1-70 characters (RFC 2046)")
    return raw


@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str]  # lower-cased names


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd
_State = Literal["preamble", "after_delimiter", "headers", "body", "epilogue"]


class MultipartSplitter:
    """Feed body chunks, get events: PartStart(headers), PartData(bytes)..., PartEnd, per part.

    `close()` raises MultipartError unless the close delimiter ("--boundary--") was seen: a body cut off
    in transit must not pass for a complete one.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = _CRLF + b"--" + boundary
        # A leading CRLF lets the first delimiter (which may open the body) match like the others.
        self._buf = bytearray(_CRLF)
        self._state: _State = "preamble"
        self.parts = 0

    @property
    def finished(self) -> bool:
        return self._state == "epilogue"

    def feed(self, chunk: bytes) -> list[Event]:
        if self._state == "epilogue":
            return []  # RFC 2046: the epilogue is ignored
        self._buf += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        if self._state != "epilogue":
            where = "before the first part" if self.parts == 0 else f"in part {self.parts}"
            raise MultipartError(f"multipart body ends {where} without its closing boundary (truncated?)")

    def _step(self, events: list[Event]) -> bool:
        """Advance one state if the buffer allows; False when more input is needed."""
        buf = self._buf
        if self._state == "preamble":
            at = buf.find(self._delimiter)
            if at < 0:
                # Keep only what could be the start of a delimiter.
                del buf[: max(0, len(buf) - len(self._delimiter) + 1)]
                return False
            del buf[: at + len(self._delimiter)]
            self._state = "after_delimiter"
            return True
        if self._state == "after_delimiter":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = "epilogue"
                buf.clear()
                return False
            eol = buf.find(_CRLF)
            if eol < 0:
                if len(buf) > 256:
                    raise MultipartError("malformed multipart delimiter line")
                return False
            if buf[:eol].strip(b" \t"):  # transport padding only (RFC 2046)
                raise MultipartError("malformed multipart delimiter line")
            del buf[: eol + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            if buf[:2] == _CRLF:  # a part without headers
                headers: dict[str, str] = {}
                del buf[:2]
            else:
                end = buf.find(_CRLF + _CRLF)
                if end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise MultipartError("multipart part headers too long")
                    return False
                if end > MAX_HEADER_BYTES:
                    raise MultipartError("multipart part headers too long")
                headers = _parse_headers(bytes(buf[:end]))
                del buf[: end + 4]
            self.parts += 1
            events.append(PartStart(headers))
            self._state = "body"
            return True
        if self._state == "body":
            at = buf.find(self._delimiter)
            if at < 0:
                keep = len(self._delimiter) - 1
                if len(buf) > keep:
                    events.append(PartData(bytes(buf[: len(buf) - keep])))
                    del buf[: len(buf) - keep]
                return False
            if at:
                events.append(PartData(bytes(buf[:at])))
            del buf[: at + len(self._delimiter)]
            events.append(PartEnd())
            self._state = "after_delimiter"
            return True
        return False


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = ""
    for line in block.decode("latin-1").split("\r\n"):
        if line[:1] in (" ", "\t") and last:  # obsolete line folding
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise MultipartError("malformed multipart part header")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers
