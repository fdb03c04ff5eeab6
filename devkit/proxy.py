"""A TCP proxy in front of PostgreSQL, for fault injection: it forwards, blackholes, or cuts connections after COMMIT.

- forward: bytes go through both ways.
- blackhole: every connection stays open and nothing goes through; what either side sends is read and dropped, as a
  network that loses every packet would, except that this machine's kernel still acknowledges it: TCP keepalives and
  tcp_user_timeout see a live peer. A side that closes meanwhile is closed on the other side when forwarding
  resumes, as the peer's TCP would then answer with a reset. Bytes dropped are lost: the stream of a connection
  that carried some is not whole again.
- cut after COMMIT: every n-th COMMIT a client sends is forwarded, the server's answer is awaited and dropped, and
  both sides are closed: the transaction committed, and the client cannot know it.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from contextlib import suppress
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# The protocol version of a startup message: the messages before it (SSL, GSS requests) and it carry no type byte.
_PROTOCOL_3 = 196608
# How long a cut waits for the server's answer to the COMMIT it forwarded.
_ANSWER_WAIT = 5.0
_TICK = 0.05


class Proxy:
    """A threaded TCP proxy on 127.0.0.1 in front of one server; start() it, close() it."""

    def __init__(self, host: str, port: int) -> None:
        # A host that is a directory names a Unix-domain socket, as libpq reads it (the embedded server has only that).
        self.target: str | tuple[str, int] = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_TICK)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._blackholed = False
        self._cut_every = 0
        self.commits = 0  # COMMITs seen while cutting
        self.cuts = 0  # connections cut right after a COMMIT
        self.connections = 0  # connections accepted
        self._closing = threading.Event()
        self._links: set[_Link] = set()
        self._thread = threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True)

    @classmethod
    def before(cls, uri: str) -> Proxy:
        """A proxy in front of the server of a postgresql:// URI, started."""
        parts = urlsplit(uri)
        host = dict(parse_qsl(parts.query)).get("host") or parts.hostname or "127.0.0.1"
        return cls(host, parts.port or 5432).start()

    def uri(self, uri: str) -> str:
        """The URI, aimed at this proxy instead of its server, without TLS (which would hide COMMIT)."""
        parts = urlsplit(uri)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        query = dict(parse_qsl(parts.query))
        query.pop("host", None)  # the proxy's own address, not the server's socket
        query.update(sslmode="disable", gssencmode="disable")
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))

    def start(self) -> Proxy:
        """Accept connections in a thread of its own."""
        self._thread.start()
        return self

    def forward(self) -> None:
        """Let everything through again; connections a side closed meanwhile are closed now."""
        with self._lock:
            self._blackholed, self._cut_every = False, 0

    def blackhole(self) -> None:
        """Keep every connection open and let nothing through, either way, until forward()."""
        with self._lock:
            self._blackholed = True

    def cut_commits(self, every: int) -> None:
        """Cut every `every`-th connection that sends a COMMIT right after the server has it, until forward()."""
        with self._lock:
            self._cut_every, self.commits = every, 0

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closing.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    def blackholed(self) -> bool:
        """Tell whether nothing goes through now."""
        with self._lock:
            return self._blackholed

    def cut_this_commit(self) -> bool:
        """Count a COMMIT on its way to the server; tell whether its connection is to be cut after it."""
        with self._lock:
            if not self._cut_every:
                return False
            self.commits += 1
            cut = self.commits % self._cut_every == 0
            self.cuts += cut
            return cut

    def _accept(self) -> None:
        """Accept connections until closed, each served by a thread of its own."""
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        """Connect to the server for one client and pump bytes between them until either side is done."""
        try:
            server = _connect(self.target)
        except OSError:
            client.close()
            return
        link = _Link(self, client, server)
        with self._lock:
            self._links.add(link)
            self.connections += 1
        try:
            link.pump(self._closing)
        finally:
            link.close()
            with self._lock:
                self._links.discard(link)


class _Link:
    """One client's connection through the proxy, and its server connection."""

    def __init__(self, proxy: Proxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.open = {client, server}  # the sides that have not closed
        self._frames = _Frames()

    def pump(self, closing: threading.Event) -> None:
        """Move bytes until a side closes (or, blackholed, until forwarding resumes after one did)."""
        for sock in (self.client, self.server):
            sock.setblocking(True)
        while not closing.is_set():
            if len(self.open) < 2 and not self.proxy.blackholed():
                return
            readable, _, _ = select.select(list(self.open), [], [], _TICK)
            for sock in readable:
                if not self._move(sock):
                    return

    def _move(self, sock: socket.socket) -> bool:
        """Read what one side sent and pass it on, drop it, or cut the link; False when the link is done."""
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.open.discard(sock)
            return self.proxy.blackholed()  # blackholed, the other side learns of it when forwarding resumes
        if self.proxy.blackholed():
            return True
        if sock is self.server:
            return _send(self.client, data)
        for message, commit in self._frames.feed(data):
            if not _send(self.server, message):
                return False
            if commit and self.proxy.cut_this_commit():
                self._await_answer()
                return False
        return True

    def _await_answer(self) -> None:
        """Wait until the server answers the COMMIT it was sent (it has committed by then), and drop the answer."""
        readable, _, _ = select.select([self.server], [], [], _ANSWER_WAIT)
        if readable:
            with suppress(OSError):
                self.server.recv(65536)

    def close(self) -> None:
        """Close both sides."""
        for sock in (self.client, self.server):
            with suppress(OSError):
                sock.close()


def _send(sock: socket.socket, data: bytes) -> bool:
    """Send all of data; False when the peer has gone."""
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True


class _Frames:
    """Splits what a client sends into protocol messages, telling which one is a COMMIT."""

    def __init__(self) -> None:
        self._buffer = b""
        self._typed = False  # after the startup message, every message starts with a type byte

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Take bytes a client sent; return the whole messages they complete, each with whether it is a COMMIT."""
        self._buffer += data
        messages = []
        while True:
            head = 5 if self._typed else 4
            if len(self._buffer) < head:
                break
            length = struct.unpack_from("!i", self._buffer, head - 4)[0] + head - 4
            if len(self._buffer) < length:
                break
            message, self._buffer = self._buffer[:length], self._buffer[length:]
            if not self._typed and struct.unpack_from("!i", message, 4)[0] == _PROTOCOL_3:
                self._typed = True
            commit = self._typed and message[:1] == b"Q" and message[5:].rstrip(b"\0").strip().upper() == b"COMMIT"
            messages.append((message, commit))
        return messages


def _connect(target: str | tuple[str, int]) -> socket.socket:
    """Connect to the server: over TCP, or to a Unix-domain socket's path."""
    if isinstance(target, tuple):
        return socket.create_connection(target, timeout=5)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.settimeout(5)
    try:
        server.connect(target)
    except OSError:
        server.close()
        raise
    return server
