"""Devices: userspace blkfront and blkback.

Owns: the blkif frontend and backend state machines, request processing, validation and the
conformance report. Must not: import xentools.tools, or know whether the platform is real Xen
or the software Xen (only xentools.platform.interface).
"""
