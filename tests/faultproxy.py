"""A TCP proxy in front of the local S3 server that injects storage outages, as a night's bucket has them.

``refuse``: the proxy stops listening and cuts every open connection (connection refused, and connections closed
mid-request, as botocore and aiohttp see a store that went away); ``slow-down``: every request is answered
``503 SlowDown`` (S3's "later"). The store itself (moto) is untouched, so what was written before stays.
"""

from __future__ import annotations

import socket
import threading

SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
             b"Content-Length: 143\r\n\r\n<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>\n")


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``target`` until told to fail (:meth:`outage`)."""

    def __init__(self, target: int) -> None:
        self.target, self.mode = target, "pass"
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(64)
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outage(self, mode: str, seconds: float) -> None:
        """Fail in ``mode`` (``refuse`` or ``slow-down``) for ``seconds`` from now, then forward again."""
        self.mode = mode
        self._cut(listening=mode != "refuse")
        self.timer = threading.Timer(seconds, self._restore)
        self.timer.start()

    def end(self) -> None:
        """End the outage now (a test that waits on what the outage causes, not on a clock)."""
        if self.timer is not None:
            self.timer.cancel()
        self._restore()

    def _restore(self) -> None:
        self.mode = "pass"
        if self.listener.fileno() == -1:
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", self.port))
            self.listener.listen(64)
            threading.Thread(target=self._accept, daemon=True).start()

    def _cut(self, listening: bool) -> None:
        """Close every open connection (kept-alive ones too), and stop listening unless ``listening``."""
        if not listening:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone would not
            except OSError:
                pass
            self.listener.close()
        with self.lock:
            for s in list(self.open):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.open.clear()

    def _accept(self) -> None:
        listener = self.listener
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by an outage
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.mode == "slow-down":
            client.settimeout(5)
            try:
                client.recv(65536)
                client.sendall(SLOW_DOWN)
            except OSError:
                pass
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        with self.lock:
            self.open |= {client, upstream}
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass
        with self.lock:
            self.open -= {a, b}
