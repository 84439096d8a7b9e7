"""The CPU backend: the Communicator interface over TCP sockets between processes.

A test transport (NCCL is the engine): it lets every parallel schedule run, and
be checked against a single process, on a laptop or in CI with no GPU.
Standard library only.

Wiring. Each rank listens on a socket and posts its address in the rendezvous
store; rank i connects to every rank j < i, so each pair shares one socket. A
reader thread per socket drains incoming frames into per-(channel, source)
queues, so a ``send`` never waits for the receiver to call ``recv`` (messages
are buffered, like MPI's eager protocol) and two ranks sending to each other
cannot deadlock. A frame is ``channel | length | bytes``; the channel names the
communicator, so the sub-communicators made by ``split`` share the sockets.

Collectives are built from point-to-point messages: every rank sends its
contribution to every other rank, and each reduces the contributions in rank
order, so all ranks get bit-identical results (O(size^2) traffic: fine for a
test transport, which is all this is).

Faults. A reader that sees the socket close marks that peer dead; waiting on
it raises ``CommError("rank 1 closed its connection ...")`` at once. A peer
that is alive but silent raises after ``timeout`` seconds.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import defaultdict, deque

import numpy as np

from .communicator import CommError, Communicator

_HEADER = struct.Struct("!HQ")  # channel name length, payload length
_POLL_S = 0.5  # socket timeout: how often blocked reads/writes look up from the wire


class _Mesh:
    """The sockets between this process and every other rank, and the inbox they fill."""

    def __init__(self, rank: int, size: int, store, timeout: float, bind_host: str):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.inbox: dict[tuple[str, int], deque] = defaultdict(deque)
        self.dead: dict[int, str] = {}  # peer -> why its connection ended
        self.arrived = threading.Condition()
        self.closed = False
        self.socks: dict[int, socket.socket] = {}
        self.send_locks = {peer: threading.Lock() for peer in range(size)}

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((bind_host, 0))
        listener.listen(size)
        # several nodes: the local end of our connection to rank 0's store is an address the others can
        # reach (the host name's address may be loopback: 127.0.1.1 on Debian-style hosts)
        host = bind_host or store.sock.getsockname()[0]
        store.arrive("cpu/address", rank, (host, listener.getsockname()[1]))
        addresses = store.wait_arrivals("cpu/address", size, timeout)
        for peer in range(rank):  # connect down, announcing who we are
            try:
                sock = socket.create_connection(addresses[peer], timeout=timeout)
            except OSError as error:
                raise CommError(f"rank {rank}: cannot connect to rank {peer} at {addresses[peer][0]}:"
                                f"{addresses[peer][1]} ({error}): it exited, or the store on MASTER_PORT belongs "
                                "to another job") from error
            sock.sendall(struct.pack("!I", rank))
            self.socks[peer] = sock
        listener.settimeout(timeout)
        try:
            for _ in range(rank + 1, size):  # accept the connections from above
                sock, _ = listener.accept()
                sock.settimeout(timeout)
                (peer,) = struct.unpack("!I", self._read(sock, 4, peer=None))
                self.socks[peer] = sock
        except socket.timeout as error:
            missing = sorted(set(range(rank + 1, size)) - set(self.socks))
            raise CommError(f"rank {rank}: ranks {missing} never connected within {timeout:g} s") from error
        finally:
            listener.close()
        for peer, sock in self.socks.items():
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(_POLL_S)
            threading.Thread(target=self._reader, args=(peer, sock), daemon=True, name=f"cpu-recv-{peer}").start()

    # ------------------------------------------------------------- reading
    def _read(self, sock, n: int, peer) -> bytearray:
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            try:
                k = sock.recv_into(view[got:])
            except socket.timeout:
                if self.closed:
                    raise ConnectionError("communicator aborted") from None
                continue
            if k == 0:
                raise ConnectionError("connection closed")
            got += k
        return buffer

    def _reader(self, peer: int, sock: socket.socket) -> None:
        try:
            while True:
                name_len, length = _HEADER.unpack(self._read(sock, _HEADER.size, peer))
                channel = self._read(sock, name_len, peer).decode()
                payload = self._read(sock, length, peer)
                with self.arrived:
                    self.inbox[(channel, peer)].append(payload)
                    self.arrived.notify_all()
        except (ConnectionError, OSError) as error:
            with self.arrived:
                self.dead[peer] = str(error)
                self.arrived.notify_all()

    def take(self, channel: str, peer: int) -> bytearray:
        """The next message from ``peer`` on ``channel``; CommError if it died or stayed silent."""
        deadline = time.monotonic() + self.timeout
        with self.arrived:
            queue = self.inbox[(channel, peer)]
            while not queue:
                if peer in self.dead:
                    raise CommError(f"rank {self.rank}: rank {peer} closed its connection "
                                    f"({self.dead[peer]}): it exited, crashed or was killed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommError(f"rank {self.rank}: timed out after {self.timeout:g} s waiting for "
                                    f"rank {peer} (is it hung?)")
                self.arrived.wait(min(left, _POLL_S))
            return queue.popleft()

    # ------------------------------------------------------------- writing
    def put(self, channel: str, peer: int, data) -> None:
        name = channel.encode()
        view = memoryview(data).cast("B")
        deadline = time.monotonic() + self.timeout
        with self.send_locks[peer]:
            sock = self.socks[peer]
            for part in (_HEADER.pack(len(name), view.nbytes) + name, view):
                part, sent = memoryview(part), 0
                while sent < part.nbytes:
                    try:
                        sent += sock.send(part[sent:])
                    except socket.timeout:  # the peer is not draining: hung, or far behind
                        if time.monotonic() > deadline:
                            raise CommError(f"rank {self.rank}: timed out after {self.timeout:g} s sending "
                                            f"to rank {peer} (is it hung?)") from None
                    except OSError as error:
                        raise CommError(f"rank {self.rank}: rank {peer} closed its connection ({error}): "
                                        "it exited, crashed or was killed") from error

    def close(self) -> None:
        self.closed = True
        for sock in self.socks.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class CPUCommunicator(Communicator):
    """Communicator over a ``_Mesh``; ``members[i]`` is the global rank of this group's rank i."""

    def __init__(self, mesh: _Mesh, members: list[int], store, name: str, timeout: float):
        super().__init__(members.index(mesh.rank), len(members), store, name, timeout)
        self.mesh, self.members = mesh, members

    @classmethod
    def create(cls, rank: int, size: int, store, timeout: float, bind_host: str = "127.0.0.1"):
        mesh = _Mesh(rank, size, store, timeout, bind_host)
        return cls(mesh, list(range(size)), store, "world", timeout)

    # ------------------------------------------------------ point to point
    def send(self, array, peer: int) -> None:
        self._check(array, "send")
        self._check_peer(peer, "send")
        self.mesh.put(self.name, self.members[peer], np.ascontiguousarray(array).reshape(-1).view(np.uint8))

    def recv(self, array_out, peer: int):
        self._check(array_out, "recv")
        self._check_peer(peer, "recv")
        payload = self.mesh.take(self.name, self.members[peer])
        if len(payload) != array_out.nbytes:
            raise CommError(f"recv from rank {peer}: got {len(payload)} bytes, the buffer holds {array_out.nbytes} "
                            f"({array_out.shape} {array_out.dtype}): send and recv disagree")
        array_out.reshape(-1)[...] = np.frombuffer(payload, dtype=array_out.dtype)
        return array_out

    def send_recv(self, send_array, send_peer: int, recv_out, recv_peer: int):
        """Either side may be None. The send is buffered by the peer's reader: no deadlock."""
        if send_array is not None:
            self.send(send_array, send_peer)
        return None if recv_out is None else self.recv(recv_out, recv_peer)

    # --------------------------------------------------------- collectives
    def _exchange(self, parts_for) -> list:
        """Send ``parts_for(peer)`` to every peer; return what each rank sent us, in rank order."""
        for peer in range(self.size):
            if peer != self.rank:
                self.mesh.put(self.name, self.members[peer], np.ascontiguousarray(parts_for(peer)).reshape(-1).view(np.uint8))
        received = []
        for peer in range(self.size):
            mine = parts_for(self.rank)
            if peer == self.rank:
                received.append(mine)
            else:
                payload = self.mesh.take(self.name, self.members[peer])
                received.append(np.frombuffer(payload, dtype=mine.dtype).reshape(mine.shape))
        return received

    @staticmethod
    def _reduce(parts: list, op: str):
        total = parts[0].copy()
        for part in parts[1:]:  # rank order: every rank adds in the same order, bit-identical results
            if op == "max":
                np.maximum(total, part, out=total)
            else:
                total += part
        if op == "avg":
            total /= len(parts)
        return total

    def all_reduce(self, array, op: str = "sum"):
        self._check(array, "all_reduce")
        self._check_op(op)
        array[...] = self._reduce(self._exchange(lambda peer: array), op)
        return array

    def _shard_rows(self, array, what: str) -> int:
        if array.ndim == 0 or array.shape[0] % self.size:
            raise ValueError(f"{what}: the first axis ({array.shape}) must divide by the group size {self.size}")
        return array.shape[0] // self.size

    def reduce_scatter(self, array, op: str = "sum"):
        self._check(array, "reduce_scatter")
        self._check_op(op)
        rows = self._shard_rows(array, "reduce_scatter")
        return self._reduce(self._exchange(lambda peer: array[peer * rows:(peer + 1) * rows]), op)

    def all_gather(self, shard):
        self._check(shard, "all_gather")
        return np.concatenate(self._exchange(lambda peer: shard), axis=0)

    def broadcast(self, array, root: int = 0):
        self._check(array, "broadcast")
        if self.rank == root:
            for peer in range(self.size):
                if peer != root:
                    self.send(array, peer)
        else:
            self.recv(array, root)
        return array

    def barrier(self) -> None:
        self.all_reduce(np.zeros(1, np.float32))

    def abort(self) -> None:
        self.mesh.close()

    def split(self, color, key: int | None = None):
        layout = self._split_layout(color, self.rank if key is None else key)
        if layout is None:
            return None
        name, members, _ = layout
        return CPUCommunicator(self.mesh, [self.members[r] for r in members], self.store, name, self.timeout)
