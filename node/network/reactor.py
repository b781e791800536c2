"""Event-driven versions of pynetdicom's two per-association loops.

Why: pynetdicom runs two threads per association, the DUL (socket, state
machine) and the association (DIMSE messages to handlers), and each of them
polls: it sleeps 1 ms whenever it finds nothing to do, then looks again. Two
costs follow. Latency: a received C-STORE waits up to a millisecond before
the association thread sees it, and its response up to another before the
DUL thread sends it, on every instance, while the sender waits (a 512 KB CT
slice takes 5 to 8 ms in all here). CPU: every idle association wakes both
threads a thousand times a second and takes the GIL from the threads doing
real work; four open associations cost a tenth of a core doing nothing.

Here the same loops block until there is work: the DUL thread in ``poll`` on
its socket and a wake-up pipe, the association thread on an Event. Whatever
feeds a loop wakes it: the queues they read are swapped for ones that signal
on ``put``. Timers (ARTIM, the network idle timeout) and flags set by other
threads are still seen within ``_MAX_WAIT_S`` without a wake-up, so a missed
signal costs time, never correctness. The state machine, the PDUs and every
check are pynetdicom's own, in the same order; only the waiting differs.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import struct
import threading
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import LOGGER as ASSOC_LOGGER
from pynetdicom.association import Association
from pynetdicom.dul import LOGGER as DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.utils import make_target

__all__ = [
    "EventAssociation", "encode_pdata_tf", "handlers_bound", "make_event_driven", "split_pdvs",
]

_MAX_WAIT_S = 0.25  # the longest either loop sleeps unsignalled (timers, foreign flags)


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A Queue that calls ``wake`` after each put, so its reader need not poll."""

    def __init__(self, wake: Callable[[], None], items: Any = ()) -> None:
        super().__init__()
        self.queue.extend(items)
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _EventDUL(DULServiceProvider):
    """DUL provider whose reactor waits in poll() instead of sleeping 1 ms."""

    _wake_r: int
    _wake_w: int

    def _prepare(self, wake_assoc: Callable[[], None]) -> None:
        self._wake_r, self._wake_w = os.pipe()
        # Guards the pipe's closing against a late wake() from another thread (e.g. the
        # association's kill() after this thread ended): a write to a closed descriptor
        # number could land in whatever file reused it.
        self._wake_lock = threading.Lock()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.to_provider_queue = _WakingQueue(self.wake, self.to_provider_queue.queue)
        self.to_user_queue = _WakingQueue(wake_assoc, self.to_user_queue.queue)
        self._wake_assoc = wake_assoc
        # pynetdicom bound its own run_reactor as the thread target at construction.
        self._target = make_target(self.run_reactor)

    def wake(self) -> None:
        """Interrupt the reactor's wait (a no-op on its own thread: it is not waiting)."""
        if threading.current_thread() is self:
            return
        with self._wake_lock:
            if self._wake_w < 0:  # the reactor has ended
                return
            with contextlib.suppress(BlockingIOError, OSError):  # full pipe: already woken
                os.write(self._wake_w, b"\0")

    def _wait(self) -> None:
        """Until the socket has data, another thread queued work, or _MAX_WAIT_S."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile: timeout only
                poller.register(sock.fileno(), select.POLLIN)
        # Wake for the ARTIM timer's expiry; at least 1 ms, as pynetdicom's own loop,
        # so an expired timer the state machine leaves running cannot spin a core.
        timeout_s = min(_MAX_WAIT_S, max(float(self.artim_timer.remaining), 0.001))
        for fd, _ in poller.poll(timeout_s * 1000.0):
            if fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (dul.py ``run_reactor``) with poll() for the 1 ms sleep."""
        try:
            self._reactor()
        finally:
            self._wake_assoc()
            with self._wake_lock:
                fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _reactor(self) -> None:
        self._idle_timer.start()
        assoc = self.assoc
        while True:
            if not assoc._dul_ready.is_set():
                assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                # As pynetdicom: an exception here would leave the state machine in an
                # unknown state, so send an A-ABORT around it and stop both loops.
                DUL_LOGGER.exception("Exception in DUL.run(), aborting association")
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                with contextlib.suppress(OSError):
                    cast(Any, self.socket).send(abort_pdu.encode())
                assoc.is_aborted = True
                assoc.is_established = False
                assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                if not self.to_provider_queue.queue and not self._kill_thread:
                    self._wait()
                continue
            self.state_machine.do_action(event)

    def _read_pdu_data(self) -> None:
        """pynetdicom's ``_read_pdu_data`` (same reads, events and errors), plus a
        direct path for P-DATA-TF PDUs on an established association.

        Why: pynetdicom turns each P-DATA-TF into a PDU object (copying it twice),
        queues it with an event for the state machine, whose action DT-2 turns it
        into a primitive and hands that to the DIMSE provider: for several 128 KB
        PDUs per instance. In Sta6 that action is all Evt10 can do, so when nothing
        is bound to the PDU, data or transition events (which would need those
        objects) the PDV items go straight from the received buffer to a DIMSE
        provider that offers ``receive_pdvs`` (node.network.scp).
        """
        sock = cast(Any, self.socket)
        try:
            header = sock.recv(6)
            pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        except (OSError, TimeoutError) as exc:
            DUL_LOGGER.error("Connection closed before the entire PDU was received")
            DUL_LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return
        except struct.error:
            self.event_queue.put("Evt17")
            return
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            DUL_LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            DUL_LOGGER.error("Connection closed before the entire PDU was received")
            DUL_LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            DUL_LOGGER.error(
                f"The received PDU is shorter than expected ({6 + len(body)} of "
                f"{6 + pdu_length} bytes received)"
            )
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x04 and self._direct(body):
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
            self.event_queue.put(event)
        except Exception as exc:
            DUL_LOGGER.error("Unable to decode the received PDU data")
            DUL_LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _direct(self, body: bytes | bytearray) -> bool:
        """Hand a P-DATA-TF's PDVs to the DIMSE provider; False: take pynetdicom's path."""
        if self.state_machine.current_state != "Sta6":
            return False
        receive = getattr(self.assoc.dimse, "receive_pdvs", None)
        if receive is None:
            return False
        if handlers_bound(self.assoc, evt.EVT_DATA_RECV, evt.EVT_PDU_RECV,
                          evt.EVT_FSM_TRANSITION):
            return False
        pdvs = split_pdvs(body)
        return pdvs is not None and bool(receive(pdvs))

    def kill_dul(self) -> None:
        self._kill_thread = True
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.wake()
        if threading.current_thread() is not self:
            self.join()
        return True


class EventAssociation(Association):
    """Association whose acceptor loop waits on an Event instead of sleeping 1 ms."""

    _wake_event: threading.Event

    def _prepare(self) -> None:
        self._wake_event = threading.Event()
        dimse = self.dimse
        dimse.msg_queue = _WakingQueue(self._wake_event.set, dimse.msg_queue.queue)

    def kill(self) -> None:
        self._wake_event.set()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop (association.py ``_run_reactor``), waiting for work."""
        wake = self._wake_event
        self._is_paused = False
        while not self._kill:
            # Clear before looking: a put after this point leaves the flag set, so
            # the wait below returns at once instead of missing it.
            wake.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                continue  # another message may be waiting already

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOC_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOC_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                ASSOC_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

            wake.wait(_MAX_WAIT_S)


def handlers_bound(assoc: Association, *events: evt.EventType) -> bool:
    """Whether any of ``events`` has a handler: such a handler needs pynetdicom's own
    objects (PDUs, primitives, transitions), so the direct paths step aside."""
    return any(assoc.get_handlers(event) for event in events)


def split_pdvs(body: bytes | bytearray) -> list[tuple[int, memoryview]] | None:
    """The (context ID, message control header + fragment) items of a P-DATA-TF
    body, as views into it; None if the items do not tile the body exactly (then
    pynetdicom's decoder decides what the malformed PDU gets)."""
    view = memoryview(body)
    out: list[tuple[int, memoryview]] = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            return None
        length = int.from_bytes(view[offset:offset + 4], "big")
        if length < 2 or offset + 4 + length > end:
            return None
        out.append((view[offset + 4], view[offset + 5:offset + 4 + length]))
        offset += 4 + length
    return out or None


def encode_pdata_tf(context_id: int, pdv: bytes) -> bytes:
    """A P-DATA-TF PDU of one PDV item (message control header + fragment)."""
    item = struct.pack(">LB", len(pdv) + 1, context_id) + pdv
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def make_event_driven(
    assoc: Association, association_class: type[EventAssociation] = EventAssociation,
) -> bool:
    """Turn a fresh, unstarted pynetdicom acceptor into the event-driven one
    (``association_class``: EventAssociation or a subclass of it).

    Returns False (and changes nothing) when either object is not exactly
    pynetdicom's class, e.g. after a pynetdicom upgrade changed what we copy.
    """
    dul = assoc.dul
    if type(assoc) is not Association or type(dul) is not DULServiceProvider:
        return False
    if assoc.is_alive() or dul.is_alive():
        return False
    assoc.__class__ = association_class
    dul.__class__ = _EventDUL
    event_assoc = cast(EventAssociation, assoc)
    event_assoc._prepare()
    cast(_EventDUL, dul)._prepare(event_assoc._wake_event.set)
    return True
