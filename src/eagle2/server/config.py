"""The server's settings: one frozen dataclass, validated at construction.

The CLI (``eagle2 serve``) parses flags into it; ``create_app`` reads it. Nothing here runs a
model or touches the network.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024  # a full-context prompt is ~40 kB of JSON; escaped non-ASCII text ~6x that
DEFAULT_MAX_PROMPT_CHARS = 100_000  # ~3x what fills SmolLM2's 8192-token context with English text
DEFAULT_BODY_TIMEOUT_S = 60.0  # a 2 MB body at 40 kB/s; a client slower than that holds a connection for nothing
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerConfig:
    """What one server instance accepts and from whom."""

    api_key: str | None = None  # require 'Authorization: Bearer <key>' on /v1/* (and the docs, when on)
    max_queue: int = 16  # requests that may wait (or be tokenized) while ``parallel`` are decoded; more get 503
    parallel: int = 8  # requests decoded side by side, their forwards run as one (each holds its own caches)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 before they are read
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS  # longer prompts get 400 before they are tokenized
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # a body not received whole within this gets 408
    host: str = "127.0.0.1"  # the bind address: a Host header naming it is accepted
    allowed_hosts: tuple[str, ...] = ()  # further Host names accepted; "*" accepts any (no DNS-rebinding guard)
    docs: bool = False  # serve /docs, /redoc and /openapi.json
    model_name: str | None = None  # the model id clients see; None: the generator's model key

    def __post_init__(self) -> None:
        for name in ("max_queue", "parallel", "max_body_bytes", "max_prompt_chars"):
            v = getattr(self, name)
            low = 0 if name == "max_queue" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {v!r}")
        t = self.body_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"body_timeout_s must be a number of seconds > 0; got {t!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None")
        if isinstance(self.allowed_hosts, str) or not all(isinstance(h, str) and h for h in self.allowed_hosts):
            raise ValueError(f"allowed_hosts must be a tuple of host names; got {self.allowed_hosts!r}")

    def host_policy(self) -> "HostPolicy":
        return HostPolicy.for_bind(self.host, self.allowed_hosts)


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def normalize_host(name: str) -> str:
    """A Host header's (or a bind address's) name: lower case, no port, no IPv6 brackets, no final dot."""
    h = name.strip().lower()
    if h.startswith("["):
        h = h[1:].split("]", 1)[0]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


@dataclass(frozen=True)
class HostPolicy:
    """Which Host headers are served: the guard against DNS rebinding, where a web page on a name the
    attacker controls re-points that name at this server and reads it with the browser's help."""

    names: frozenset[str]
    any_ip: bool  # bound to every interface: any IP literal (a page cannot rebind a literal address)
    any_host: bool  # "*" given

    @classmethod
    def for_bind(cls, host: str, allowed: tuple[str, ...] = ()) -> "HostPolicy":
        bind = normalize_host(host)
        names = {bind} | {normalize_host(h) for h in allowed if h != "*"}
        ip = _ip(bind)
        wildcard = bind in WILDCARD_HOSTS
        if wildcard or bind == "localhost" or (ip is not None and ip.is_loopback):
            names |= set(LOOPBACK_NAMES)
        return cls(frozenset(names), wildcard, "*" in allowed)

    def allows(self, header: str | None) -> bool:
        if header is None:  # HTTP/1.0 without Host: no browser sends that
            return True
        h = normalize_host(header)
        if self.any_host or h in self.names:
            return True
        return self.any_ip and _ip(h) is not None
