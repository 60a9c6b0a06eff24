"""Independent test peers that dcud's interoperability tests talk to (each in its own process).

Nothing here ships with dcud and nothing here imports dcud's protocol code: a peer built on the code it
tests would agree with every misreading of the standard. See README.md for the fixtures' API.
"""
