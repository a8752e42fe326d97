"""The sans-IO relay between one client and its server connection: no asyncio, no clock, no sockets.

- `replies`: the one queue of what the server owes, and what to do with each server message;
- `statements`: the client's prepared statements and what a server connection holds of them;
- `settings`: the client's session settings under transaction pooling;
- `session`: the client session's states and the one table of legal moves;
- `relay`: the client-to-server stream, in session or transaction mode (a strategy each);
- `flow`: the one owner of pausing and resuming reads on both sides.
"""
