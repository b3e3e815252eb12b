"""Platform layer: one interface to grants, event channels, xenstore and barriers.

Owns: the abstract interface (interface.py), the xenstore client (xenstore.py), and two
implementations: the software Xen (sim/) and real Xen through cffi (xen/).
Must not: import xentools.devices or xentools.tools, or know anything about blkif.
Frontend and backend code sees only `Platform` and never learns which one it runs on.
"""
