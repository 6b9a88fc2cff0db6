"""The protobuf wire format by hand, for the few places where tensor bytes must not be copied.

Protobuf's Python classes copy a `bytes` field on every step (into the message, out to the wire,
out of a parsed message), and on a host where fresh memory is slow to fault in those copies
dominate a large request. The messages that carry tensors (`moirai.stage.v1.PushRequest`,
`ModelInferRequest`/`ModelInferResponse` of the Open Inference Protocol) therefore keep their
small fields in protobuf and have their tensor bytes framed here: `fields` walks a message's
top-level fields, `split_bytes_field` takes one repeated bytes field out as views into the
received payload, `bytes_field_parts` appends one to a serialised message. What comes out is the
ordinary wire format, which any protobuf implementation reads and writes.

Malformed input raises `InvalidInput`, like every other malformed tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

from stage_server.errors import InvalidInput

LENGTH_DELIMITED = 2


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def varint(value: int) -> bytes:
    if value < 0x80:  # a small message's lengths
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.cache
def key(number: int) -> bytes:
    """The key of length-delimited field `number`."""
    return varint(number << 3 | LENGTH_DELIMITED)


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InvalidInput("malformed message: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buf: memoryview) -> Iterator[tuple[int, int, int, int]]:
    """(field number, start of the field's key, start of its value, end) of each field."""
    pos, size = 0, len(buf)
    while pos < size:
        start = pos
        tag = buf[pos]
        if tag < 0x80:  # one-byte keys are the rule (field numbers up to 15): skip the call
            pos += 1
        else:
            tag, pos = read_varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == LENGTH_DELIMITED:
            length = buf[pos] if pos < size else 0x80
            if length < 0x80:
                pos += 1
            else:
                length, pos = read_varint(buf, pos)
            end = pos + length
        elif wire_type == 0:
            _, end = read_varint(buf, pos)
        elif wire_type == 1:
            end = pos + 8
        elif wire_type == 5:
            end = pos + 4
        else:
            raise InvalidInput(f"malformed message: wire type {wire_type}")
        if end > size:
            raise InvalidInput("malformed message: a field runs past the end")
        yield number, start, pos, end
        pos = end


def split_bytes_field(payload: bytes, number: int) -> tuple[bytes, list[memoryview]]:
    """The message without its repeated bytes field `number`, and that field's values as views
    into `payload` (no copy)."""
    buf = memoryview(payload)
    rest: list[memoryview] = []
    values: list[memoryview] = []
    for field, start, value, end in fields(buf):
        if field == number:
            values.append(buf[value:end])
        else:
            rest.append(buf[start:end])
    return b"".join(rest), values


def bytes_field_parts(number: int, values: Iterable[memoryview]) -> list[bytes | memoryview]:
    """Parts that, joined after a serialised message, add each value to its repeated bytes
    field `number` (the values are copied once, by the join)."""
    tag = key(number)
    parts: list[bytes | memoryview] = []
    for value in values:
        parts += [tag, varint(value.nbytes), value]
    return parts
