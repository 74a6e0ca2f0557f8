"""Addresses as text: ``host:port``, with IPv6 literals in brackets
(``[::1]:8081``), as Go's ``net.JoinHostPort`` writes them and
``net.SplitHostPort`` reads them back.

Every address tcprelay prints, hands out, logs or parses goes through here.
"""

import socket


def is_ipv6_literal(host):
    """True if ``host`` (no brackets) is an IPv6 address, with or without a zone."""
    if not isinstance(host, str) or ":" not in host:
        return False
    try:
        socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    except (OSError, ValueError):
        return False
    return True


def join_host_port(host, port):
    """``"host:port"``, or ``"[v6]:port"`` for an IPv6 literal (any host with a colon)."""
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


def format_sockaddr(address):
    """A socket address (``getpeername()`` and the like) as ``host:port``; other
    values (a Unix socket's path) as ``str``."""
    try:
        host, port = address[:2]
        return join_host_port(host, int(port))
    except (TypeError, ValueError):
        return str(address)


def split_host_port(text, default_host=None):
    """``(host, port)`` from ``host:port`` or ``[v6]:port``; a bare port with
    ``default_host`` given. The host comes back without brackets.

    Raises ValueError saying what is wrong: no port, a port outside 1-65535, an
    IPv6 literal without brackets (``::1:5432`` is ambiguous).
    """
    if default_host is not None and text.isdigit():
        host, port = default_host, text
    elif text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1:]
        if end < 0 or not rest.startswith(":") or not is_ipv6_literal(host):
            raise ValueError("%r is not [IPv6]:PORT, like [::1]:5432" % text)
        port = rest[1:]
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError("%r: an IPv6 address goes in brackets, like [%s]:%s"
                             % (text, host, port))
        if not sep or not host:
            raise ValueError("%r is not HOST:PORT, like 127.0.0.1:5432" % text)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("%r has no port number (1-65535)" % text)
    return host, int(port)


def with_port(text):
    """``(host, port)`` if ``text`` is ``host:port`` or ``[v6]:port``, else None
    (a bare IPv6 address, ``::1``, is a host alone)."""
    if is_ipv6_literal(text):
        return None
    try:
        return split_host_port(text)
    except ValueError:
        return None


def bracketed(host):
    """``host`` as it is written before ``:port``: an IPv6 literal in brackets."""
    return "[%s]" % host if ":" in host else host


def host_option(text):
    """A host given alone (an option like ``--host``): ``[::1]`` and ``::1`` are both ``::1``.

    Raises ValueError for a host with a port (``localhost:8080``), for brackets
    around anything but an IPv6 address, and for any other colon.
    """
    host_port = with_port(text)
    if host_port is not None:
        raise ValueError("%r is a host with a port; give the host alone, %r"
                         % (text, bracketed(host_port[0])))
    if text.startswith("[") or text.endswith("]"):
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else None
        if inner is None or not is_ipv6_literal(inner):
            raise ValueError("%r: brackets go around an IPv6 address only, like [::1]" % text)
        return inner
    if ":" in text and not is_ipv6_literal(text):
        raise ValueError("%r is not a host: a colon goes only in an IPv6 address" % text)
    return text


def _host_name_char(c):
    return c.isalnum() or c in "-_."


def public_host(text):
    """The public host name in the ASCII form handed to services: IDNA for a
    non-ASCII name (``bücher.example`` is ``xn--bcher-kva.example``), an IPv6
    literal without brackets.

    Raises ValueError saying why ``text`` cannot be a host name.
    """
    host = host_option(text)
    if is_ipv6_literal(host):
        return host.split("%", 1)[0]   # our interface's zone means nothing to a service
    if ":" in host:
        raise ValueError("%r is a host name with a port; give the name only" % text)
    try:
        ascii_name = host.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError("%r is not a host name IDNA can encode (%s)" % (text, exc))
    if not ascii_name or not all(_host_name_char(c) for c in ascii_name):
        raise ValueError("%r is not a host name (letters, digits, '-' and '.')" % text)
    return ascii_name


def dialled_host(sockname):
    """The relay's address as a service dialled it (``getsockname()`` of its
    connection): reaches this relay from the service's side by construction.
    An IPv4-mapped IPv6 address comes back as IPv4, and a zone is dropped."""
    host = sockname[0].split("%", 1)[0]
    if host.lower().startswith("::ffff:") and "." in host:
        return host[len("::ffff:"):]
    return host
