"""xentools: Xen's paravirtual block protocol, spoken for real from userspace.

Layers (dependencies point one way, top to bottom):
    xentools.core      protocol core: blkif structs, ring, xenbus handshake, xs_wire, vbd
                       numbers, grant-DMA model. Pure: never touches a file descriptor.
    xentools.platform  one interface to grants, event channels, xenstore and barriers, with
                       two implementations: real Xen (cffi) and the software Xen (sim).
    xentools.devices   userspace blkfront and blkback, written against the platform interface.
    xentools.tools     the `xentools` CLI, benchmarks and guest image boot tests.
"""

__version__ = "0.1.0"
