"""A TCP proxy on 127.0.0.1 that tests use to break connections on purpose.

Put it in front of the test server (for example as the advertised streaming URL)
and call :meth:`TcpProxy.cut` to drop every open connection, :meth:`TcpProxy.refuse`
to make new connections fail, or :meth:`TcpProxy.stall` to keep connections open
while nothing gets through.

One thread accepts connections and one thread per connection moves bytes both
ways. Only those threads touch their sockets. The public methods ask them to act
and wait until they have, so a method's effect is in place when it returns.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
CHUNK_BYTES = 65536
# Stop reading from a side while this much is waiting to be written to the other.
MAX_BUFFERED_BYTES = 1 << 20
CONNECT_TIMEOUT_SECONDS = 5.0
COMMAND_TIMEOUT_SECONDS = 5.0


def _wake(writer: socket.socket) -> None:
    # A full or closed wake-up socket means the thread is awake already or gone.
    with contextlib.suppress(OSError):
        writer.send(b"x")


def _drain(reader: socket.socket) -> None:
    try:
        while reader.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass


class _Connection:
    """One client connection and its connection to the target, pumped by a thread."""

    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self._proxy = proxy
        self._client = client
        self._upstream: socket.socket | None = None
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._close_requested = False
        self._reset_on_close = False
        self.thread = threading.Thread(
            target=self._run, name="tcp-proxy-pump", daemon=True
        )

    def request_close(self, *, reset: bool) -> None:
        self._reset_on_close = reset
        self._close_requested = True
        _wake(self._wake_writer)

    def wake(self) -> None:
        _wake(self._wake_writer)

    def _run(self) -> None:
        try:
            self._upstream = socket.create_connection(
                (self._proxy.target_host, self._proxy.target_port),
                timeout=CONNECT_TIMEOUT_SECONDS,
            )
        except OSError as error:
            logger.warning(
                "proxy could not connect to %s:%s: %s",
                self._proxy.target_host,
                self._proxy.target_port,
                error,
            )
            self._close_all()
            return
        try:
            self._pump()
        except OSError:
            pass  # A peer reset or closed its side: the connection is over.
        finally:
            self._close_all()

    def _pump(self) -> None:
        client, upstream = self._client, self._upstream
        assert upstream is not None
        client.setblocking(False)
        upstream.setblocking(False)
        to_upstream = bytearray()
        to_client = bytearray()
        ended = False  # One side closed: flush what is left, then close both.

        while not self._close_requested:
            if ended and not to_upstream and not to_client:
                return
            readers: list[socket.socket] = [self._wake_reader]
            writers: list[socket.socket] = []
            if not self._proxy.stalled:
                if not ended and len(to_upstream) < MAX_BUFFERED_BYTES:
                    readers.append(client)
                if not ended and len(to_client) < MAX_BUFFERED_BYTES:
                    readers.append(upstream)
                if to_upstream:
                    writers.append(upstream)
                if to_client:
                    writers.append(client)

            readable, writable, _ = select.select(readers, writers, [])
            if self._wake_reader in readable:
                _drain(self._wake_reader)
            # stall() takes this lock too, so once it returns no pump forwards.
            # The sockets do not block, so the lock is held only briefly.
            with self._proxy.forward_lock:
                if self._close_requested or self._proxy.stalled:
                    continue
                for source, buffer in ((client, to_upstream), (upstream, to_client)):
                    if source in readable:
                        data = source.recv(CHUNK_BYTES)
                        if data:
                            buffer.extend(data)
                        else:
                            ended = True
                for target, buffer in ((upstream, to_upstream), (client, to_client)):
                    if target in writable and buffer:
                        sent = target.send(buffer)
                        del buffer[:sent]

    def _close_all(self) -> None:
        if self._reset_on_close:
            # SO_LINGER with a zero timeout makes close() send RST, not FIN.
            linger = struct.pack("ii", 1, 0)
            with contextlib.suppress(OSError):
                self._client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        for sock in (
            self._client,
            self._upstream,
            self._wake_reader,
            self._wake_writer,
        ):
            if sock is not None:
                sock.close()
        self._proxy._forget(self)


class TcpProxy:
    """Forward TCP connections from 127.0.0.1:``port`` to the target port.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.stalled = False
        self.accepted_count = 0
        self._port: int | None = None
        self._listener: socket.socket | None = None
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self.forward_lock = threading.Lock()
        self._refusing = False
        self._stopping = False
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._listener_changed = threading.Condition(self._lock)
        self._accept_thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------

    def start(self) -> TcpProxy:
        """Bind a free port on 127.0.0.1 and start accepting connections."""
        if self._accept_thread is not None:
            return self
        self._listener = self._listen(0)
        self._port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="tcp-proxy-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket, and join the threads."""
        if self._accept_thread is None:
            return
        with self._lock:
            self._stopping = True
        _wake(self._wake_writer)
        self._accept_thread.join(COMMAND_TIMEOUT_SECONDS)
        self.cut()
        self._accept_thread = None
        self._wake_reader.close()
        self._wake_writer.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._port is None:
            raise RuntimeError("the proxy is not started; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, for use as a base URL."""
        return f"http://{HOST}:{self.port}"

    @property
    def open_connections(self) -> int:
        """How many client connections are open now."""
        with self._lock:
            return len(self._connections)

    # --- failures -----------------------------------------------------------

    def cut(self, *, reset: bool = False) -> int:
        """Close every open connection now and return how many there were.

        Both sides see the connection end: with ``reset`` the client gets a TCP
        reset (connection reset by peer), otherwise an ordinary close in the middle
        of whatever it was reading. New connections are still accepted.
        """
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.request_close(reset=reset)
        for connection in connections:
            connection.thread.join(COMMAND_TIMEOUT_SECONDS)
        return len(connections)

    def refuse(self, refusing: bool = True) -> None:
        """Refuse new connections (connection refused) until called with False.

        The listening socket is closed, so a client gets ECONNREFUSED at once, as
        from a server that is down; requests raises ConnectionError. Open
        connections stay open. Listening resumes on the same port.
        """
        with self._lock:
            self._refusing = refusing
            _wake(self._wake_writer)
            # Wait until the accept thread has closed or reopened the listener.
            done = self._listener_changed.wait_for(
                lambda: (self._listener is None) == refusing,
                timeout=COMMAND_TIMEOUT_SECONDS,
            )
        if not done:
            raise RuntimeError(f"the proxy could not switch refuse={refusing}")

    def stall(self, stalled: bool = True) -> None:
        """Stop (or resume) forwarding bytes in both directions.

        Connections stay open and new ones are accepted, but nothing passes until
        ``stall(False)``; bytes already read are delivered then.
        """
        with self.forward_lock:
            self.stalled = stalled
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.wake()

    # --- threads --------------------------------------------------------------

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Lets a refused proxy listen again on its port although closed connections
        # on that port are still in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen(64)
        listener.setblocking(False)
        return listener

    def _accept_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    self._apply_refusing()
                    listener = self._listener
                readers = [self._wake_reader] + ([listener] if listener else [])
                readable, _, _ = select.select(readers, [], [])
                if self._wake_reader in readable:
                    _drain(self._wake_reader)
                if listener is not None and listener in readable:
                    self._accept(listener)
        finally:
            with self._lock:
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                self._listener_changed.notify_all()

    def _apply_refusing(self) -> None:
        # Called with the lock held, on the accept thread only.
        if self._refusing and self._listener is not None:
            self._listener.close()
            self._listener = None
        elif not self._refusing and self._listener is None:
            self._listener = self._listen(self.port)
        self._listener_changed.notify_all()

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(True)
        connection = _Connection(self, client)
        with self._lock:
            self._connections.add(connection)
            self.accepted_count += 1
        connection.thread.start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
