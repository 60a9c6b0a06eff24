"""CiA 301 heartbeat consumer, sans-I/O: heartbeat arrivals and ``now`` in, events and a deadline out.

A :class:`HeartbeatWatch` watches the nodes of one bus. The glue around it (``dcud.service.drives``)
tells it every heartbeat that arrives (:meth:`HeartbeatWatch.heartbeat`), asks it when it next has to
look (:meth:`HeartbeatWatch.next_deadline`), sleeps until then on its clock and hands it the time
(:meth:`HeartbeatWatch.handle_timer`), the way aioquic's connection is driven by ``get_timer`` and
``handle_timer``. The watch never polls: healthy nodes cost one look per timeout, a lost heartbeat is
seen at its deadline.

Per node the watch knows a :class:`HeartbeatStatus` and a timeout (None: not watched). A node is
overdue once ``now >= last heartbeat + timeout``; then it is ``lost`` (:class:`HeartbeatLost`), and its
next heartbeat brings it back (:class:`HeartbeatBack`). A node whose producer time is 0 has no
heartbeat to watch: :meth:`HeartbeatWatch.set_timeout` with None marks it ``off``.

Time is seconds on one monotonic clock, whatever clock the caller uses, as everywhere in ``dcud.codec``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dcud.errors import LocalProtocolError

HEARTBEAT_FACTOR = 1.5
HEARTBEAT_MARGIN_S = 0.2


def heartbeat_timeout_s(producer_time_ms: int) -> float:
    """Consumer timeout for a producer time: 1.5 x, but at least 200 ms more than the period.

    The margin keeps a loaded DCU (or a drive whose producer jitters) from reporting false losses at
    short producer times; at 1 s and above the factor dominates.
    """
    period_s = producer_time_ms / 1000.0
    return round(max(period_s * HEARTBEAT_FACTOR, period_s + HEARTBEAT_MARGIN_S), 3)


class HeartbeatStatus(enum.StrEnum):
    """What the watch knows of a node's heartbeat (the drive state document's ``heartbeat``)."""

    UNKNOWN = "unknown"
    """Nothing heard since the node was added or the bus (re)opened."""
    OK = "ok"
    OFF = "off"
    """The node produces no heartbeat (producer time 0): its SDO polls watch it instead."""
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class HeartbeatLost:
    """No heartbeat of ``node_id`` within ``timeout_s``."""

    node_id: int
    timeout_s: float


@dataclass(frozen=True, slots=True)
class HeartbeatBack:
    """A heartbeat of ``node_id`` after it was lost."""

    node_id: int


HeartbeatEvent = HeartbeatLost | HeartbeatBack


class _Node:
    __slots__ = ("last_s", "status", "timeout_s")

    def __init__(self, timeout_s: float | None) -> None:
        self.status = HeartbeatStatus.UNKNOWN
        self.timeout_s = timeout_s
        self.last_s = 0.0


class HeartbeatWatch:
    """The heartbeat consumer of the nodes on one bus (module docstring)."""

    def __init__(self) -> None:
        self._nodes: dict[int, _Node] = {}

    def add(self, node_id: int, timeout_s: float | None = None) -> None:
        """Watch ``node_id`` (status unknown) with ``timeout_s``, or without one until :meth:`set_timeout`."""
        if timeout_s is not None and timeout_s <= 0:
            raise LocalProtocolError(f"node {node_id}: heartbeat timeout {timeout_s} s must be positive")
        self._nodes[node_id] = _Node(timeout_s)

    def _node(self, node_id: int) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            raise LocalProtocolError(f"node {node_id} is not watched")
        return node

    def status(self, node_id: int) -> HeartbeatStatus:
        """The node's heartbeat status."""
        return self._node(node_id).status

    def timeout_s(self, node_id: int) -> float | None:
        """The node's consumer timeout, or None while it has none."""
        return self._node(node_id).timeout_s

    def set_timeout(self, node_id: int, timeout_s: float | None) -> None:
        """The timeout learnt from the node (producer time 1017); None: it sends none, status ``off``."""
        if timeout_s is not None and timeout_s <= 0:
            raise LocalProtocolError(f"node {node_id}: heartbeat timeout {timeout_s} s must be positive")
        node = self._node(node_id)
        node.timeout_s = timeout_s
        if timeout_s is None:
            node.status = HeartbeatStatus.OFF

    def reset(self, node_id: int) -> None:
        """Forget what was heard (the bus closed): ``unknown``, not watched until the next heartbeat."""
        self._node(node_id).status = HeartbeatStatus.UNKNOWN

    def heartbeat(self, node_id: int, now: float) -> list[HeartbeatEvent]:
        """A heartbeat (or boot-up) of ``node_id`` arrived at ``now``: ``[HeartbeatBack]`` if it was lost."""
        node = self._node(node_id)
        node.last_s = now
        if node.status is HeartbeatStatus.OK:
            return []
        was_lost = node.status is HeartbeatStatus.LOST
        node.status = HeartbeatStatus.OK
        return [HeartbeatBack(node_id)] if was_lost else []

    def next_deadline(self) -> float | None:
        """When the first watched heartbeat becomes overdue, or None while no node is watched."""
        deadline: float | None = None
        for node in self._nodes.values():
            if node.status is HeartbeatStatus.OK and node.timeout_s is not None:
                due = node.last_s + node.timeout_s
                if deadline is None or due < deadline:
                    deadline = due
        return deadline

    def handle_timer(self, now: float) -> list[HeartbeatEvent]:
        """Every node whose heartbeat is overdue at ``now`` is lost (one event each, once)."""
        events: list[HeartbeatEvent] = []
        for node_id, node in self._nodes.items():
            timeout = node.timeout_s
            if node.status is HeartbeatStatus.OK and timeout is not None and now >= node.last_s + timeout:
                node.status = HeartbeatStatus.LOST
                events.append(HeartbeatLost(node_id, timeout))
        return events


__all__ = [
    "HEARTBEAT_FACTOR",
    "HEARTBEAT_MARGIN_S",
    "HeartbeatBack",
    "HeartbeatEvent",
    "HeartbeatLost",
    "HeartbeatStatus",
    "HeartbeatWatch",
    "heartbeat_timeout_s",
]
