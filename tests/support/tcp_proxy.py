"""A real TCP proxy that tests stop and start to cut a client off its server (psycopg's fix_proxy idea).

It listens on 127.0.0.1 (the same port across ``stop()``/``start()``, as a restarted server would) and
forwards to a TCP address or a Unix socket (the embedded PostgreSQL listens on one). ``stop()`` closes
the listener and every live connection, so clients see their connections drop and new ones refused.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Self

import psycopg


class TcpProxy:
    def __init__(self, target: tuple[str, int] | str) -> None:
        """``target``: ``(host, port)`` or the path of a Unix socket."""
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @classmethod
    def for_postgres(cls, url: str) -> Self:
        """A proxy to the server of a PostgreSQL URL (TCP host or Unix-socket directory)."""
        params = psycopg.conninfo.conninfo_to_dict(url)
        host, port = str(params.get("host") or "/run/postgresql"), int(str(params.get("port") or 5432))
        return cls(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port))

    def url_for(self, url: str) -> str:
        """``url`` rewritten to go through the proxy."""
        return psycopg.conninfo.make_conninfo(url, host="127.0.0.1", port=str(self.port))

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(32)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)

    def stop(self) -> None:
        """Refuse new connections and cut every live one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            return upstream
        return socket.create_connection(self.target)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed by stop()
            try:
                upstream = self._connect_upstream()
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # stopped while connecting
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, destination: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                destination.sendall(data)
        except OSError:
            pass
        finally:
            # One direction ended: end both, as a dropped TCP connection would.
            for sock in (source, destination):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                for sock in (source, destination):
                    if sock in self._sockets:
                        self._sockets.discard(sock)
                        sock.close()
