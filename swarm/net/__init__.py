"""Everything that talks to hivemind: the DHT and its signed member records (``membership``,
``records``), identities and private-swarm credentials (``auth``, ``private``), libp2p streams
(``streams``: framing, the handler skeleton, callers, retry) and link probes (``probe``).

The one subpackage that imports hivemind (``tests/test_layers.py`` enforces it).
"""
