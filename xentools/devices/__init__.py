"""Devices: userspace blkfront and blkback.

Owns: the blkif frontend and backend state machines, request processing, validation, the
conformance report, and the locks that keep one blkback per vbd and one writer per image. Must not: import xentools.tools, or know whether the platform is real Xen
or the software Xen (only xentools.platform.interface).
"""
