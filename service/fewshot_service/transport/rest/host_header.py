"""The ``Host`` header as RFC 9110 (section 7.2) defines it: ``uri-host [ ":" port ]``.

``uri-host`` is an IP-literal in brackets (IPv6, or IPvFuture), an IPv4 address or a reg-name
(RFC 3986: unreserved characters, percent-escapes and sub-delims); ``port`` is digits only. A
looser split ("everything before the last colon") let ``localhost:18000@evil.example``,
``[::1]evil.example`` or ``localhost:evil`` pass as ``localhost``; those are not host names at all.
"""

from __future__ import annotations

import ipaddress
import re

# RFC 3986 reg-name: *( unreserved / pct-encoded / sub-delims ).
_REG_NAME = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
_IP_FUTURE = re.compile(r"[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+")
_PORT = re.compile(r"[0-9]*")


class MalformedHost(ValueError):
    """The value is not ``uri-host [ ":" port ]``."""


def parse_host(value: str) -> str:
    """The host of a ``Host`` header value, lower-cased, without brackets, port or trailing dot,
    an IPv6 address in its canonical form (``[0:0::1]:8000`` -> ``::1``); MalformedHost, naming
    why, when the value is not RFC 9110's."""
    if value.startswith("["):
        literal, bracket, rest = value[1:].partition("]")
        if not bracket:
            raise MalformedHost("an IP literal without its closing ']'")
        if not _IP_FUTURE.fullmatch(literal):
            try:
                if "%" in literal:  # a zone id (ipaddress takes one): RFC 9110 has none
                    raise ValueError(literal)
                literal = str(ipaddress.IPv6Address(literal))  # [0:0::1] is [::1]
            except ValueError:
                raise MalformedHost("the bracketed part is not an IPv6 address") from None
        host = literal
    else:
        host = value.partition(":")[0]
        rest = value[len(host) :]
        if not host:
            raise MalformedHost("no host name")
        if not _REG_NAME.fullmatch(host):
            raise MalformedHost("the host name has characters a host name cannot have")
    if rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:])):
        raise MalformedHost("only ':' and a port of digits may follow the host")
    return host.lower().rstrip(".")


def normalize_host_name(name: str) -> str:
    """A configured host name (``--allowed-hosts``) in the form :func:`parse_host` returns;
    an IPv6 address may be given with or without brackets."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.IPv6Address(name))
    except ValueError:
        return name.rstrip(".")
