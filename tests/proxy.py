"""A TCP proxy in front of the test server whose connections can go silent.

``freeze()`` makes every connection open at that moment stop passing bytes,
either way, while both of its sockets stay open: what a client sees when the
network between it and its server fails without a word (a failover, a
firewall that forgot the flow). Connections opened afterwards pass as usual,
as they would to a replacement server. Nothing is closed until ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class _Link:
    def __init__(self) -> None:
        self.frozen = False
        self.writers: list[asyncio.StreamWriter] = []


class SilentProxy:
    def __init__(self, dsn: str) -> None:
        params = conninfo_to_dict(dsn)
        self._dsn = dsn
        self._host = str(params.get("host", "127.0.0.1"))
        self._port = int(params.get("port", 5432))
        self._links: list[_Link] = []
        self._marker: bytes | None = None
        self._deliver = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def start(self) -> SilentProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def dsn(self) -> str:
        """The test server's DSN, through this proxy (TCP, even if the server's
        own is a Unix socket)."""
        return make_conninfo(self._dsn, host="127.0.0.1", port=self.port)

    @property
    def connections(self) -> int:
        return len(self._links)

    def freeze(self) -> None:
        async def go() -> None:
            for link in self._links:
                link.frozen = True

        asyncio.run_coroutine_threadsafe(go(), self._loop).result(10)

    def freeze_when(self, marker: bytes, *, deliver: bool = False) -> None:
        """Freeze the first connection to send ``marker`` to the server, as
        it sends it: the statement is lost on the way, or with ``deliver``,
        reaches the server, whose answer is lost."""

        async def go() -> None:
            self._marker = marker
            self._deliver = deliver

        asyncio.run_coroutine_threadsafe(go(), self._loop).result(10)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for link in self._links:
                for writer in link.writers:
                    writer.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _accept(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        link = _Link()
        try:
            if self._host.startswith("/"):  # a Unix socket's directory
                server_r, server_w = await asyncio.open_unix_connection(
                    f"{self._host}/.s.PGSQL.{self._port}"
                )
            else:
                server_r, server_w = await asyncio.open_connection(
                    self._host, self._port
                )
        except OSError:
            client_w.close()
            return
        link.writers = [client_w, server_w]
        self._links.append(link)
        await asyncio.gather(
            self._pipe(link, client_r, server_w, up=True),
            self._pipe(link, server_r, client_w, up=False),
        )

    async def _pipe(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        up: bool,
    ) -> Any:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                if up and self._marker is not None and self._marker in data:
                    self._marker = None
                    if self._deliver:
                        sink.write(data)
                        await sink.drain()
                        link.frozen = True
                        continue
                    link.frozen = True
                if link.frozen:
                    continue  # lost on the way, as on a silent network
                sink.write(data)
                await sink.drain()
        # An end (or an error) passes on only while the link is up: a frozen
        # link carries no goodbye either.
        if not link.frozen:
            sink.close()
