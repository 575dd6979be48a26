"""Networking: lab topology, virtual switches, TAP devices, link shaping, announce, probes."""
