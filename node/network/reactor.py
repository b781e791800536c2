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
import threading
from collections.abc import Callable
from typing import Any, cast

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.utils import make_target

__all__ = ["make_event_driven"]

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
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.to_provider_queue = _WakingQueue(self.wake, self.to_provider_queue.queue)
        self.to_user_queue = _WakingQueue(wake_assoc, self.to_user_queue.queue)
        self._wake_assoc = wake_assoc
        self._target = make_target(self.run_reactor)

    def wake(self) -> None:
        """Interrupt the reactor's wait (a no-op on its own thread: it is not waiting)."""
        if threading.current_thread() is self:
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
            for fd in (self._wake_r, self._wake_w):
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
                from pynetdicom.dul import LOGGER

                LOGGER.exception("Exception in DUL.run(), aborting association")
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


class _EventAssociation(Association):
    """Association whose acceptor loop waits on an Event instead of sleeping 1 ms."""

    _wake_event: threading.Event

    def _prepare(self) -> None:
        self._wake_event = threading.Event()
        dimse = self.dimse
        dimse.msg_queue = _WakingQueue(self._wake_event.set, dimse.msg_queue.queue)
        self._target = make_target(self.run_reactor)

    def kill(self) -> None:
        self._wake_event.set()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop (association.py ``_run_reactor``), waiting for work."""
        from pynetdicom import evt
        from pynetdicom.association import LOGGER

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
                LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOGGER.info(log_msg)
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
                LOGGER.error("Network timeout reached")
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


def make_event_driven(assoc: Association) -> bool:
    """Turn a fresh, unstarted pynetdicom acceptor into the event-driven one.

    Returns False (and changes nothing) when either object is not exactly
    pynetdicom's class, e.g. after a pynetdicom upgrade changed what we copy.
    """
    dul = assoc.dul
    if type(assoc) is not Association or type(dul) is not DULServiceProvider:
        return False
    if assoc.is_alive() or dul.is_alive():
        return False
    assoc.__class__ = _EventAssociation
    dul.__class__ = _EventDUL
    event_assoc = cast(_EventAssociation, assoc)
    event_assoc._prepare()
    cast(_EventDUL, dul)._prepare(event_assoc._wake_event.set)
    return True
