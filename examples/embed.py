"""echosvc inside a larger Trio program: start it, use it, shut it down."""

import trio

import echosvc


async def main() -> None:
    config = echosvc.Config(port=0, read_timeout=60)
    async with trio.open_nursery() as nursery:
        server: echosvc.Server = await nursery.start(echosvc.serve, config)
        print("serving on", ", ".join(server.addresses))

        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"hello from the same process\n")
            print("echoed:", await stream.receive_some())

        print(server.statistics())
        server.shutdown()  # graceful: serve() returns once connections drain


trio.run(main)
