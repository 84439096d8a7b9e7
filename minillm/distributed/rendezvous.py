"""A tiny TCP key-value store on rank 0: how the ranks of a job first meet.

Before any GPU can talk to another, the processes must agree on something:
NCCL needs one 128-byte *unique id*, made by rank 0 and given to everyone; the
CPU backend needs each rank's listening address. Rank 0 therefore opens a TCP
server on ``MASTER_ADDR:MASTER_PORT`` holding a dictionary, and every rank
(rank 0 included) connects to it as a client:

    store.set("nccl/uid", uid_bytes)         # rank 0
    uid = store.get("nccl/uid")              # everyone: waits until it is there
    store.arrive("init", rank); store.wait_arrivals("init", world_size)

Every wait has a timeout; when ranks never show up, the error names them
("ranks [2, 3] never arrived at 'init' within 60 s"), instead of hanging.

The wire format is a 4-byte big-endian length followed by a pickle, one request
and one reply per message. Pickle trusts its peer: like torchrun's store, this
is for a trusted cluster network only.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
import time

_LENGTH = struct.Struct("!I")


class RendezvousError(RuntimeError):
    """A peer never arrived, or the store could not be reached, within the timeout."""


def send_message(sock: socket.socket, obj) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes; ConnectionError if the peer closed the connection first."""
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k
    return bytes(buffer)


def recv_message(sock: socket.socket):
    (length,) = _LENGTH.unpack(recv_exactly(sock, _LENGTH.size))
    return pickle.loads(recv_exactly(sock, length))


class _StoreServer:
    """The dictionary and its server thread (rank 0 only). One thread per client."""

    def __init__(self, host: str, port: int):
        self.data: dict[str, object] = {}
        self.changed = threading.Condition()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, port))
        except OSError as error:
            raise RendezvousError(f"rank 0 cannot listen on {host}:{port} ({error}); is the port in use? "
                                  "choose another with --master-port / MASTER_PORT") from error
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True, name="store-accept").start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # listener closed
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="store-client").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    request = recv_message(conn)
                except (ConnectionError, OSError, EOFError):
                    return
                send_message(conn, self._handle(*request))

    def _handle(self, command: str, *args):
        if command == "set":
            key, value = args
            with self.changed:
                self.data[key] = value
                self.changed.notify_all()
            return None
        if command == "add":
            key, amount = args
            with self.changed:
                self.data[key] = self.data.get(key, 0) + amount
                self.changed.notify_all()
                return self.data[key]
        if command == "wait":  # wait until every key exists; reply with the values, or the missing keys
            keys, timeout = args
            deadline = time.monotonic() + timeout
            with self.changed:
                while True:
                    missing = [k for k in keys if k not in self.data]
                    if not missing:
                        return ("ok", [self.data[k] for k in keys])
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return ("missing", missing)
                    self.changed.wait(min(left, 1.0))
        raise ValueError(f"unknown store command {command!r}")

    def close(self) -> None:
        try:   # wakes the accept thread: a socket closed under a blocked accept() stays bound (port in use)
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


class TCPStore:
    """Client of the store (rank 0 also runs the server). Thread-safe: one request at a time."""

    def __init__(self, host: str, port: int, is_server: bool, timeout: float = 60.0):
        self.timeout = float(timeout)
        # a one-machine job listens on loopback only; a multi-node job on every interface
        bind_host = "127.0.0.1" if host in ("127.0.0.1", "localhost") else ""
        self.server = _StoreServer(bind_host, port) if is_server else None
        self.host, self.port = host, port if self.server is None else self.server.port
        self.lock = threading.Lock()
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=5.0)
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as error:  # rank 0 may simply not be up yet: retry until the deadline
                if time.monotonic() > deadline:
                    raise RendezvousError(
                        f"could not reach rank 0's rendezvous store at {self.host}:{self.port} within "
                        f"{self.timeout:g} s ({error}); check MASTER_ADDR/MASTER_PORT and that rank 0 started"
                    ) from error
                time.sleep(0.1)

    def _request(self, *request):
        with self.lock:
            try:
                send_message(self.sock, request)
                return recv_message(self.sock)
            except (ConnectionError, OSError, EOFError) as error:
                raise RendezvousError(f"lost the connection to the rendezvous store on rank 0 ({error}); "
                                      "rank 0 has probably exited") from error

    def set(self, key: str, value) -> None:
        self._request("set", key, value)

    def add(self, key: str, amount: int = 1) -> int:
        return self._request("add", key, amount)

    def get(self, key: str, timeout: float | None = None):
        """The value of ``key``, waiting for some rank to set it."""
        return self.wait([key], timeout)[0]

    def wait(self, keys: list[str], timeout: float | None = None) -> list:
        timeout = self.timeout if timeout is None else timeout
        status, result = self._request("wait", list(keys), timeout)
        if status != "ok":
            raise RendezvousError(f"timed out after {timeout:g} s waiting for {', '.join(result)}")
        return result

    def arrive(self, name: str, rank: int, value=True) -> None:
        self.set(f"{name}/rank{rank}", value)

    def wait_arrivals(self, name: str, ranks, timeout: float | None = None) -> list:
        """Wait until every rank in ``ranks`` has called ``arrive(name, rank)``; their values in order."""
        ranks = list(range(ranks)) if isinstance(ranks, int) else list(ranks)
        timeout = self.timeout if timeout is None else timeout
        status, result = self._request("wait", [f"{name}/rank{r}" for r in ranks], timeout)
        if status != "ok":
            missing = [int(key.rsplit("/rank", 1)[1]) for key in result]
            raise RendezvousError(f"ranks {missing} never arrived at {name!r} within {timeout:g} s "
                                  "(they failed to start, crashed, or are hung)")
        return result

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if self.server is not None:
                self.server.close()
