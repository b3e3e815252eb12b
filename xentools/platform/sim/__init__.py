"""Software Xen: xenstored, grant tables and event channels across processes.

Owns: the stand-ins for what Xen and dom0 provide when there is no hypervisor: a software
xenstored speaking xs_wire on unix sockets (xenstored.py, node semantics in
xenstore_store.py), grant tables and event channels shared between processes.
Must not: import xentools.devices or xentools.tools, or be imported by code that runs on
real Xen; devices reach it only through xentools.platform.interface.
"""
