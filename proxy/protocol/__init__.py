"""Sans-IO Postgres protocol 3.0: framing, message codec, SCRAM client and error builders.

Nothing in this package touches sockets, asyncio or the clock.
"""
