"""The public endpoint's limits: what one client, or all of them, may make a front end hold.

A front end that accepts whatever arrives can be made to hold any amount of memory: requests
in flight each hold their tensors, a body is buffered while it is read, and a connection that
never finishes its request holds its buffers forever. So every one of these is capped, with
defaults that a newcomer never meets, and a client over a cap gets a status that says which
(`stage_server.errors`), never a traceback. (The settings and their flags are
`stage_server.settings`'s.)

- requests in flight (`InFlight`, `--max-in-flight`): inference requests held by the front end,
  over gRPC and HTTP together, counted from the moment an HTTP request's headers arrive (before
  its body is read) or a gRPC request's message has arrived. One over the cap is refused at
  once with RESOURCE_EXHAUSTED / 429. gRPC also caps its calls of every kind, before their
  message is read, at `grpc_call_cap` (the cap plus room for health checks and metadata);
- the size of a request (`--max-request-bytes`, and what the model's inputs can take when their
  shapes are fixed): refused on its declared length before a byte of it is read (HTTP
  Content-Length, gRPC's message header), and an HTTP body without a length stops being read
  past the limit. The same limit counts a request's tensors as they take memory decoded, which
  for string tensors is several times their wire size (`codec.Budget`): such a request is
  refused while its strings are decoded;
- time: an HTTP body must arrive within the request's timeout (408 otherwise); an HTTP connection
  idle between requests, or that never completes its request's headers, is closed after the idle
  timeout; a gRPC connection without calls is closed after the idle timeout, one whose client
  stopped answering keepalive pings after `KEEPALIVE_TIMEOUT_S`, and every gRPC connection after
  `MAX_CONNECTION_AGE_S` (its calls then get the request timeout to finish; clients reconnect by
  themselves), which bounds how long a client that sends its message slowly holds a call. A
  request's deadline is what its client asked, never beyond the server's request timeout
  (`request_timeout_s`: the gateway, a batcher and a remote model alike).

So a front end holds at most about `max_in_flight` x `max_request_bytes` of requests per
transport, whatever its clients do.
"""

from __future__ import annotations

from stage_server.errors import Overloaded

KEEPALIVE_S = 30.0
"""How often the gRPC server pings a client whose connection carries nothing."""
KEEPALIVE_TIMEOUT_S = 10.0
MAX_CONNECTION_AGE_S = 600.0
GRPC_CALL_ROOM = 64
"""gRPC calls allowed beyond the requests in flight: health checks, readiness, metadata."""


def request_timeout_s(asked_s: float | None, longest_s: float) -> float:
    """A request's timeout: what its client asked (None: nothing), at most `longest_s`."""
    return longest_s if asked_s is None else min(asked_s, longest_s)


class InFlight:
    """Inference requests a front end holds now, over every transport; refuses past `limit`.

    Used as a context manager around the handling of one request: two attribute updates per
    request, nothing more, on the front end's hot path."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def __enter__(self) -> None:
        if self.count >= self.limit:
            raise Overloaded(
                f"the server holds {self.count} requests, its limit (--max-in-flight): retry later"
            )
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        self.count -= 1


def grpc_options(idle_timeout_s: float, grace_s: float) -> list[tuple[str, int]]:
    """The gRPC server options that time out idle, dead and old connections (`grace_s`: what
    calls get to finish when their connection reaches its maximum age)."""
    return [
        ("grpc.max_connection_idle_ms", int(idle_timeout_s * 1000)),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.max_connection_age_ms", int(MAX_CONNECTION_AGE_S * 1000)),
        ("grpc.max_connection_age_grace_ms", int(grace_s * 1000)),
    ]


def grpc_call_cap(max_in_flight: int) -> int:
    return max_in_flight + GRPC_CALL_ROOM
