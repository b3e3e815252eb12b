"""blkfront's rings: the queues of one device, granted and bound together.

Owns: `RingSet`, the device's BlkfrontQueues (one shared ring and one event channel per
queue, multi-queue-num-queues of them): granting each ring's pages to the backend and binding
its port, registering each release with the device's Teardown right after it was acquired,
finding a queue by its port, choosing the next queue for a request (round robin), and the
FrontendRingInfo that names them.
Must not: talk to xenstore (blkfront_xenbus writes the ring info), build or check requests
(blkfront_requests, blkfront_queue), or grant data pages (blkfront_grants).
"""

from __future__ import annotations

from collections.abc import Callable

from xentools.core.blkif import SlotCodec
from xentools.core.features import FrontendRingInfo, Negotiated, QueueRing
from xentools.devices.blkfront_queue import BlkfrontQueue
from xentools.devices.blkfront_teardown import Teardown
from xentools.platform.interface import EventChannels, GrantSharer, PlatformError

__all__ = ["RingSet"]


class RingSet:
    """The rings of one device. `queues` in queue order, `by_port` port -> queue.

    `published` is True once their FrontendRingInfo is in xenstore: from then on the
    backend may map the rings, so they are released only after it closed. After the
    device's teardown, `leaked_pages` counts ring pages left shared (unshare refused).
    """

    def __init__(self) -> None:
        self.queues: list[BlkfrontQueue] = []
        self.by_port: dict[int, BlkfrontQueue] = {}
        self.published = False
        self.leaked_pages = 0
        self._next = 0

    def grant(
        self,
        sharer: GrantSharer,
        channels: EventChannels,
        backend_id: int,
        transport: Negotiated,
        codec: SlotCodec,
        full_barrier: Callable[[], None] | None,
        teardown: Teardown,
    ) -> None:
        """Share `transport.num_queues` rings of `transport.ring_pages` pages with the
        backend and bind one event channel for each."""
        for index in range(transport.num_queues):
            pages = sharer.share(backend_id, transport.ring_pages, writable=True)
            teardown.on_close(f"ring {index} pages", lambda pages=pages, index=index: self._unshare(sharer, pages, index))
            port = channels.bind_unbound(backend_id)
            teardown.on_close(f"ring {index} event channel", lambda port=port: channels.unbind(port))
            queue = BlkfrontQueue(index, codec, pages, transport.ring_page_order, full_barrier, port)
            self.queues.append(queue)
            self.by_port[port] = queue

    def _unshare(self, sharer: GrantSharer, pages, index: int) -> None:
        if index < len(self.queues):
            self.queues[index].ring.shared.release()  # no view of the pages outlives them
        try:
            sharer.unshare(pages)
        except PlatformError:
            self.leaked_pages += len(pages.refs)

    def ring_info(self, transport: Negotiated, protocol: str) -> FrontendRingInfo:
        return transport.ring_info([QueueRing(q.pages.refs, q.port) for q in self.queues], protocol)

    def next_queue(self) -> BlkfrontQueue:
        """The queue for the next request (round robin)."""
        queue = self.queues[self._next]
        self._next = (self._next + 1) % len(self.queues)
        return queue

    def busy(self) -> bool:
        """A request is on a ring, holds a slot, or waits in a backlog."""
        return any(q.in_flight or q.backlog for q in self.queues)
