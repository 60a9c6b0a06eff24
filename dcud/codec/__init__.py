"""Sans-I/O protocol code: bytes and `now` in; frames, events, actions and deadlines out.

Nothing here imports asyncio, socket, time or logging (design.md rule 1).
"""
