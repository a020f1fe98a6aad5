"""The socket `wecast serve` listens on (engine.web.server.listen): connections accepted on it have Nagle's algorithm
off, as asyncio sets it for TCP sockets, so an answer written in two parts (head, then body) is not held back for
the client's delayed ACK (with it on, every request on a keep-alive connection took 40 ms more)."""

from __future__ import annotations

import asyncio
import socket

from engine.web.server import listen


def test_accepted_connections_have_nagle_off() -> None:
    """A connection accepted by an asyncio server on listen()'s socket has TCP_NODELAY set."""

    async def go() -> int:
        sock = listen("127.0.0.1", 0)
        port = sock.getsockname()[1]
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("socket")
            seen.set_result(peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            nodelay = await asyncio.wait_for(seen, 10)
            writer.close()
            return nodelay
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(go()) != 0
