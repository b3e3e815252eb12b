"""Protocol core: wire formats, ring, handshake and grant-DMA logic; disk image formats.

Owns: everything that can be decided from bytes and state alone.
Must not: open files or sockets, sleep, spawn, or import from xentools.platform,
xentools.devices or xentools.tools. Memory barriers are hooks the caller passes in.
"""
