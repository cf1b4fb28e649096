"""
Flow-control windows: the credit arithmetic of one stream, apart from its lifecycle.

Both wire dialects control flow per stream only (neither has a tunnel-wide
window; the outer gRPC call's HTTP/2 windows sit below the tunnel), so one
:class:`FlowWindow` per stream carries both directions:

* **sending**: the credit we hold.  A chunk is charged before it goes
  (:meth:`FlowWindow.charge`); a peer ``window_update`` adds to it
  (:meth:`FlowWindow.add_credit`).
* **receiving**: the credit the peer holds, as ``granted - taken``.  Each data
  frame is checked against it and charged (:meth:`FlowWindow.receive`); an
  overrun raises :class:`FlowControlError`.  Credit goes back to the peer only
  once the application consumed what it was charged for, and only in batches of
  at least the update threshold (:meth:`FlowWindow.release`), as h2's
  ``WindowManager`` does.

How costs are counted is the :class:`FlowPolicy`'s business (it lives here
too, with the three policies the dialects use): ``sesame.type`` charges at
least ``min_cost`` per frame and lets a sender go while its credit is
positive; ``grpctunnel.v1`` revision 1 counts bytes exactly and never lets a
chunk exceed the credit.

The lifecycle (which frames may arrive, when a stream ends) lives in the
state table of :mod:`sesame.core._machine`; this module only counts, so it can
be tested, and reasoned about, on its own.  Like the rest of
:mod:`sesame.core` it does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from sesame.core._frames import RESOURCE_EXHAUSTED, TunnelError


@dataclass(frozen=True, slots=True)
class FlowPolicy:
    """
    Per-stream flow control, one direction's rules for both directions.

    ``sesame.type`` counts frames (each costs at least ``min_cost``) and lets
    a sender go while its credit is positive; ``grpctunnel.v1`` revision 1
    counts bytes exactly and never lets a chunk exceed the credit.
    """

    name: str
    enabled: bool = True
    send_window: int = 65535  # credit we start with, per stream
    recv_window: int = 65535  # credit the peer starts with, per stream
    update_threshold: int = 26214  # return credit once this much was consumed
    min_cost: int = 258
    max_chunk: int = 16256
    byte_exact: bool = False  # chunks never exceed the remaining credit
    # Until a stream's sender shows it holds more credit than the protocol's
    # fixed 65,535 (+ one 16,256 chunk), return credit at the protocol's
    # threshold: a peer that never learned our larger window would wait
    # for an update we were batching (see the window extension in
    # sesame.tunnel._service).
    compat_threshold: int = 26214
    compat_outstanding: int = 65535 + 16256

    def cost(self, n: int) -> int:
        """The flow cost of a data frame of ``n`` bytes (at least ``min_cost``)."""
        return n if n > self.min_cost else self.min_cost


SESAME_FLOW = FlowPolicy("sesame.type")
GRPCTUNNEL_FLOW = FlowPolicy(
    "grpctunnel.v1/1", send_window=65536, recv_window=65536, update_threshold=1,
    min_cost=0, max_chunk=16384, byte_exact=True,
)
GRPCTUNNEL_REV0 = FlowPolicy("grpctunnel.v1/0", enabled=False, min_cost=0, max_chunk=16384)


class FlowControlError(TunnelError):
    """
    The peer sent more than its window allowed.

    The core ends the offending stream with this error's status
    (``RESOURCE_EXHAUSTED``, "flow control window exceeded"); the tunnel
    itself survives.
    """

    code = RESOURCE_EXHAUSTED


class FlowWindow:
    """
    The send and receive credit of one stream under one :class:`FlowPolicy`.

    Plain integers, no frames: the caller turns :meth:`release`'s answer into a
    ``window_update`` and a :meth:`charge` into a chunk.  With a disabled policy
    (``grpctunnel.v1`` revision 0) sending is never limited and receiving never
    checked; the consumption bookkeeping still runs, as it always did.

    :param policy: the stream's flow rules.
    :param send_credit: credit we start with; ``policy.send_window`` when
        None (``grpctunnel.v1`` clients announce their own in ``new_stream``).
    """

    __slots__ = (
        "_policy", "credit", "granted", "taken", "pending", "big_sender",
        "unconsumed", "deferred",
    )

    def __init__(self, policy: FlowPolicy, send_credit: int | None = None) -> None:
        self._policy = policy
        #: Credit we hold for sending; may go negative under ``sesame.type``.
        self.credit = policy.send_window if send_credit is None else send_credit
        #: Credit ever given to the peer: the initial window plus every update.
        self.granted = policy.recv_window
        #: Flow cost received from the peer.
        self.taken = 0
        #: Cost consumed but not yet returned (below the update threshold).
        self.pending = 0
        #: The peer proved it holds more than the protocol's default window.
        self.big_sender = False
        #: Delivered messages with a cost that the application has not consumed.
        self.unconsumed = 0
        #: Cost of partial-message frames held back while the application lags.
        self.deferred = 0

    @property
    def policy(self) -> FlowPolicy:
        """The flow rules this window counts by."""
        return self._policy

    @property
    def available(self) -> int:
        """Credit the peer still holds for sending to us (``granted - taken``)."""
        return self.granted - self.taken

    # --- sending --------------------------------------------------------------

    def charge(self, n: int, total: int) -> int:
        """
        Charge one outgoing chunk before it is sent.

        :param n: bytes the sender would like to send (already capped at the
            policy's ``max_chunk``).
        :param total: size of the whole message the chunk belongs to; an empty
            message may always go under a byte-exact policy (it costs nothing).
        :returns: the bytes that may go now (``n`` or, byte-exact, less), with
            their cost taken from :attr:`credit`; ``-1`` when the credit is
            spent and the sender must wait for a window update.
        """
        pol = self._policy
        if not pol.enabled:
            return n
        credit = self.credit
        if pol.byte_exact:
            if credit <= 0 and total != 0:
                return -1
            if n > credit:
                n = credit if credit > 0 else 0
            self.credit = credit - (n if n > pol.min_cost else pol.min_cost)
            return n
        if credit <= 0:
            return -1
        self.credit = credit - (n if n > pol.min_cost else pol.min_cost)
        return n

    def add_credit(self, increment: int) -> bool:
        """
        Apply a peer ``window_update``.

        :param increment: the update's increment; zero or less is ignored, as
            is every update under a disabled policy.
        :returns: True if it was applied and sending may resume (credit is
            now positive).
        """
        if not self._policy.enabled or increment <= 0:
            return False
        self.credit += increment
        return self.credit > 0

    # --- receiving ------------------------------------------------------------

    def receive(self, n: int) -> int:
        """
        Check and charge one incoming data frame of ``n`` bytes.

        ``sesame.type``: a frame is legal if credit remained before it (the
        sender may overshoot by one frame).  ``grpctunnel.v1``: its bytes must
        fit the credit exactly.

        :param n: the frame's data length.
        :returns: the frame's flow cost, to be handed back through
            :meth:`message_consumed` or :meth:`fragment_received`.
        :raises FlowControlError: the frame exceeds the peer's credit; nothing
            was charged.
        """
        pol = self._policy
        cost = n if n > pol.min_cost else pol.min_cost
        if pol.enabled:
            avail = self.granted - self.taken
            if (n > avail) if pol.byte_exact else (avail <= 0):
                raise FlowControlError("flow control window exceeded")
            self.taken += cost
            if not self.big_sender and (
                self.taken - (self.granted - pol.recv_window) > pol.compat_outstanding
            ):
                self.big_sender = True
        return cost

    def message_delivered(self, cost: int) -> None:
        """
        Note a whole message handed to the application, not yet consumed.

        :param cost: the message's flow cost; zero-cost messages are not
            counted (they need no :meth:`message_consumed`).
        """
        if cost:
            self.unconsumed += 1

    def fragment_received(self, cost: int) -> int:
        """
        Account a frame of a message still being reassembled.

        While the application keeps up (every delivered message consumed) such
        a frame's credit may go back at once: it sits in the reassembly buffer,
        bounded by the message size limit, and a message larger than the window
        could never finish otherwise.  While it lags, the credit is held until
        it catches up, so unread messages cannot pile up beyond one window.

        :param cost: the frame's flow cost.
        :returns: the cost to :meth:`release` now (``cost`` or 0).
        """
        if self.unconsumed:
            self.deferred += cost
            return 0
        return cost

    def message_consumed(self, cost: int) -> int:
        """
        The application took one delivered message.

        :param cost: that message's flow cost (0 for zero-cost messages).
        :returns: the cost to :meth:`release` now: ``cost`` plus, once no
            delivered message is left unconsumed, the fragments held back.
        """
        if cost > 0 and self.unconsumed > 0:  # zero-cost messages were never counted
            self.unconsumed -= 1
        if self.unconsumed == 0 and self.deferred:
            cost += self.deferred
            self.deferred = 0
        return cost

    def release(self, cost: int, *, discard: bool = False) -> int:
        """
        Return consumed credit to the peer, batched.

        Credit accumulates until it reaches the policy's update threshold (the
        protocol's default threshold while the peer has not shown a larger
        window, so a peer that never learned ours is not left waiting).
        ``policy.enabled`` is not consulted: a revision-0 stream receiving a
        message in several frames returns their credit, as the core always
        has (the peer ignores it).

        :param cost: credit consumed since the last call; 0 or less does nothing.
        :param discard: drop the batch instead of granting it, once it is due
            (the peer will send nothing more on this stream).
        :returns: the increment to send in a ``window_update``, already counted
            in :attr:`granted`; 0 when nothing is due (or it was discarded).
        """
        if cost <= 0:
            return 0
        pending = self.pending + cost
        pol = self._policy
        threshold = pol.update_threshold
        if not self.big_sender and threshold > pol.compat_threshold:
            threshold = pol.compat_threshold
        if pending < threshold:
            self.pending = pending
            return 0
        self.pending = 0
        if discard:
            return 0
        self.granted += pending
        return pending


__all__ = [
    "GRPCTUNNEL_FLOW",
    "GRPCTUNNEL_REV0",
    "SESAME_FLOW",
    "FlowControlError",
    "FlowPolicy",
    "FlowWindow",
]
