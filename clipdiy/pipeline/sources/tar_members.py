"""The members of a tar stream, read front to back with bounded memory, with their data offsets.

Why not :mod:`tarfile`: in stream mode it ends quietly at a header cut short or a corrupt header
after the first (a truncated shard would look complete), and it does not let a caller skip a
member's data without reading it into its buffers. This reader knows ustar/GNU/pax headers (the
formats Python's ``tarfile``, GNU tar and the WebDataset writers produce), GNU long names (``L``)
and pax ``path`` records, and nothing else; every damage it finds raises :class:`TarDamage`
with the error kind of the label-row schema (``truncated`` or ``corrupt``).

Memory: one 512-byte header at a time, plus the member data a caller asks for
(:meth:`TarStream.read_data`, bounded by the caller's ``max_bytes``); skipped data is read and
dropped in chunks of :data:`SKIP_CHUNK` (a streamed GET cannot seek).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
SKIP_CHUNK = 1 << 20
#: Type flags of members that hold a file's bytes (regular file, old-style regular, contiguous).
FILE_TYPES = (b"0", b"\0", b"7")
#: Headers that describe the next member (GNU long name/link, pax extended, pax global).
_META_TYPES = (b"L", b"K", b"x", b"g")
#: A long name or pax record larger than this is not a name: the header is corrupt.
_MAX_META_BYTES = 1 << 20


class TarDamage(Exception):
    """The stream is not a readable tar from here on. ``kind``: ``truncated`` or ``corrupt``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class TarMember:
    """One regular file of the archive: ``name`` (path inside the tar), ``offset`` (byte offset of
    its data in the uncompressed stream), ``size`` (bytes of data)."""

    name: str
    offset: int
    size: int


def _number(field: bytes) -> int:
    """A header's numeric field: octal text, or GNU base-256 (high bit of the first byte set)."""
    if field[:1] and field[0] & 0x80:
        value = field[0] & 0x3F
        for byte in field[1:]:
            value = (value << 8) | byte
        return value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarDamage("corrupt", f"a tar header's number {text[:20]!r} is not octal") from None


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156]
    try:
        expected = _number(stored)
    except TarDamage:
        return False
    unsigned = sum(header[:148]) + 8 * 0x20 + sum(header[156:])
    return expected == unsigned


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header (``"<len> path=<value>\\n"`` records)."""
    position = 0
    path = None
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            break
        try:
            length = int(data[position:space])
        except ValueError:
            raise TarDamage("corrupt", "a pax header record has no length") from None
        if length <= 0:
            break
        record = data[space + 1: position + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        position += length
    return path


class TarStream:
    """Iterate the regular-file members of the tar in ``stream`` (``.read(n)`` only).

    Between two members the caller may call :meth:`read_data` once for the current member;
    whatever it does not read is skipped when the iteration goes on.
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self.position = 0  # bytes consumed from the stream
        self._data_left = 0  # bytes of the current member's data not yet consumed
        self._padding = 0  # zero padding after the current member's data

    def _read(self, n: int) -> bytes:
        chunks = []
        while n > 0:
            chunk = self._stream.read(n)
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
            self.position += len(chunk)
        return b"".join(chunks)

    def _exactly(self, n: int, what: str) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise TarDamage("truncated", f"the tar ends inside {what} (at byte {self.position}, {n - len(data)} bytes short)")
        return data

    def _skip(self, n: int, what: str) -> None:
        while n > 0:
            step = min(n, SKIP_CHUNK)
            self._exactly(step, what)
            n -= step

    def read_data(self, member: TarMember, max_bytes: int | None = None) -> bytes:
        """The current member's data (raises :class:`TarDamage` ``truncated`` when the stream ends
        first). ``max_bytes``: callers check ``member.size`` against their limit before calling."""
        if self._data_left != member.size or (max_bytes is not None and member.size > max_bytes):
            raise ValueError("read_data: not the current member, or larger than max_bytes")
        data = self._exactly(member.size, f"the data of {member.name!r}")
        self._data_left = 0
        return data

    def _finish_member(self) -> None:
        self._skip(self._data_left + self._padding, "a member's data")
        self._data_left = self._padding = 0

    def members(self) -> Iterator[TarMember]:
        long_name: str | None = None
        pax_name: str | None = None
        zero_blocks = 0
        while True:
            self._finish_member()
            header = self._read(BLOCK)
            if not header:
                if self.position == 0:
                    raise TarDamage("corrupt", "the file is empty, not a tar")
                return  # ends at a member boundary without the end marker: as GNU tar, accepted
            if len(header) < BLOCK:
                raise TarDamage("truncated", f"the tar ends inside a header (at byte {self.position})")
            if header == bytes(BLOCK):
                zero_blocks += 1
                if zero_blocks == 2:
                    return  # the end-of-archive marker
                continue
            if zero_blocks:
                raise TarDamage("corrupt", f"a zero block inside the tar, before byte {self.position}")
            if not _checksum_ok(header):
                what = "not a tar file" if self.position == BLOCK else f"a corrupt tar header at byte {self.position - BLOCK}"
                raise TarDamage("corrupt", what)
            size = _number(header[124:136])
            kind = header[156:157]
            self._data_left = size
            self._padding = -size % BLOCK
            if kind in _META_TYPES:
                if size > _MAX_META_BYTES:
                    raise TarDamage("corrupt", f"a {kind.decode()!r} header of {size} bytes at byte {self.position - BLOCK}")
                data = self._exactly(size, "a long-name header")
                self._data_left = 0
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax_name = _pax_path(data) or pax_name
                continue
            name = pax_name or long_name
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:262] == b"ustar":
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    if prefix:
                        name = f"{prefix}/{name}"
            long_name = pax_name = None
            if kind in FILE_TYPES:
                yield TarMember(name=name, offset=self.position, size=size)
            # Links, folders and other types are skipped (with whatever data they declare).
