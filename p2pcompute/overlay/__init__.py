"""The overlay: py-libp2p host, GossipSub topics, discovery and the peer table.

Uses :mod:`p2pcompute.wire`, :mod:`p2pcompute.identity` and :mod:`p2pcompute.errors`.
"""
