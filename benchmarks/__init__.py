"""Measurements: throughput against references and a peer tool, GPU runs. The top layer; nothing imports it."""

#: Marker before the JSON result line of :mod:`benchmarks.peer_tiatoolbox`, which runs in another interpreter
#: (one with tiatoolbox): the project's benchmark reads it without importing the peer module.
PEER_MARK = "PEER-TIATOOLBOX "
