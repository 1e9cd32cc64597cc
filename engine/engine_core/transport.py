"""Framing of the messages between the API server and the engine-core process.

Rule: every ZMQ message is two frames, a one-byte type tag and a msgpack payload of the
msgspec structs in `engine_core/messages.py`; decoding picks the struct from the tag, so
nothing on the wire is pickled and the core never runs code it received.
"""

from __future__ import annotations

import enum
from typing import Any, Optional

import msgspec

from engine.messages.core import EngineCoreOutputs, EngineCoreRequest


class RequestType(bytes, enum.Enum):
    """Client -> core."""

    ADD = b"\x00"
    ABORT = b"\x01"
    UTILITY = b"\x02"
    SHUTDOWN = b"\x03"


class OutputType(bytes, enum.Enum):
    """Core -> client."""

    OUTPUTS = b"\x00"
    UTILITY_RESULT = b"\x01"
    ERROR = b"\x02"  # the core hit an exception and is about to exit
    REQUEST_ERROR = b"\x03"  # one request was refused; the core goes on


class UtilityCall(msgspec.Struct, array_like=True):
    call_id: int
    method: str
    args: list[Any] = []


class UtilityResult(msgspec.Struct, array_like=True):
    call_id: int
    result: Any = None
    error: Optional[str] = None


class RequestError(msgspec.Struct, array_like=True):
    request_id: str
    message: str


# Methods of EngineCore a client may call through UTILITY; an allow-list keeps the wire
# from becoming a remote-code channel.
UTILITY_METHODS = frozenset({"reset_prefix_cache", "ping", "start_profile", "stop_profile"})

_encoder = msgspec.msgpack.Encoder()
_request_decoders: dict[RequestType, msgspec.msgpack.Decoder] = {
    RequestType.ADD: msgspec.msgpack.Decoder(EngineCoreRequest),
    RequestType.ABORT: msgspec.msgpack.Decoder(list[str]),
    RequestType.UTILITY: msgspec.msgpack.Decoder(UtilityCall),
    RequestType.SHUTDOWN: msgspec.msgpack.Decoder(type(None)),
}
_output_decoders: dict[OutputType, msgspec.msgpack.Decoder] = {
    OutputType.OUTPUTS: msgspec.msgpack.Decoder(EngineCoreOutputs),
    OutputType.UTILITY_RESULT: msgspec.msgpack.Decoder(UtilityResult),
    OutputType.ERROR: msgspec.msgpack.Decoder(str),
    OutputType.REQUEST_ERROR: msgspec.msgpack.Decoder(RequestError),
}


def encode(tag: RequestType | OutputType, payload: Any) -> list[bytes]:
    """The two frames of one message."""
    return [tag.value, _encoder.encode(payload)]


def decode_request(frames: list[bytes]) -> tuple[RequestType, Any]:
    tag = RequestType(bytes(frames[0]))
    return tag, _request_decoders[tag].decode(frames[1])


def decode_output(frames: list[bytes]) -> tuple[OutputType, Any]:
    tag = OutputType(bytes(frames[0]))
    return tag, _output_decoders[tag].decode(frames[1])
