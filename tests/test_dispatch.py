"""node.network.dispatch: connections go to the least busy receiver process, over real
sockets (the fd passing is the kernel's SCM_RIGHTS, nothing mocked)."""

from __future__ import annotations

import socket
import threading
import time

from node.network.dispatch import Dispatcher, channel_pair, ended, serve_channel


def _wait(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_least_busy_process_gets_each_connection_and_serves_it() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    d = Dispatcher()
    ours, theirs = channel_pair()
    d.add(ours, pid=4242)
    adopted: list[tuple[socket.socket, tuple[str, int]]] = []
    gone = threading.Event()
    threading.Thread(target=serve_channel,
                     args=(theirs, lambda s, a: adopted.append((s, a)), gone.set),
                     daemon=True).start()
    clients, decisions = [], []
    for _ in range(4):
        c = socket.create_connection(("127.0.0.1", port))
        clients.append(c)
        server_side, address = listener.accept()
        passed = d.hand_over(server_side, address)
        decisions.append(passed)
        server_side.close()  # passed: the other process has its own descriptor now;
        # kept: stands for an association the main process is running
    # Ties go to the receiver process; then whichever has fewer running.
    assert decisions == [True, False, True, False]
    _wait(lambda: len(adopted) == 2)
    assert d.counts() == {"main": 2, "4242": 2}
    d.local_done()
    d.local_done()
    assert d.counts()["main"] == 0
    # The passed descriptor is the live connection: bytes from the client arrive on it.
    sock, address = adopted[0]
    assert address == clients[0].getsockname()
    clients[0].sendall(b"ping")
    assert sock.recv(4) == b"ping"
    # Associations ending in that process bring its count down.
    ended(theirs)
    _wait(lambda: d.counts()["4242"] == 1)
    d.close()
    _wait(gone.is_set)
    for s, _ in adopted:
        s.close()
    for c in clients:
        c.close()
    listener.close()


def test_a_dead_process_gets_nothing_more() -> None:
    d = Dispatcher()
    ours, theirs = channel_pair()
    d.add(ours, pid=7)
    theirs.close()  # the receiver process died
    _wait(lambda: "7" not in d.counts())
    a, b = socket.socketpair()
    assert d.hand_over(a, ("127.0.0.1", 1)) is False  # served by the main process
    assert d.counts() == {"main": 1}
    a.close()
    b.close()
    d.close()
