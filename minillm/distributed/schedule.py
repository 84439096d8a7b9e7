"""Pipeline parallel, part 2: running the stages (GPipe and 1F1B).

One optimizer step = M micro-batches through P stages. Stage s receives an
activation from s-1, runs its blocks, sends the result to s+1; later it
receives the gradient of the loss with respect to that result from s+1, runs
its backward from it, and sends the gradient with respect to its own input to
s-1. The chain rule, cut at the stage boundaries: for the last block's output
``out`` of stage s and the received g = dL/d(out),

    out.backward(g)        # accumulates dL/dθ for this stage's θ, and dL/d(input) in input.grad

which is exactly what one process computes across that boundary. The last
stage starts each chain with ``loss.backward(1 / M)``: the step's loss is the
mean over micro-batches, so gradients add up as in gradient accumulation.

Schedules (F = forward of a micro-batch, B = its backward):

    GPipe  all forwards, then all backwards: every stage holds M micro-batches'
           activations at the peak.
    1F1B   warm-up: stage s runs P-1-s forwards; steady state: one forward,
           one backward, alternating; cool-down: the remaining backwards.
           At most P-s micro-batches are in flight on stage s.

Both have the same bubble: every stage idles for (P-1) of the (M+P-1) slots
of a step, so the idle fraction is (P-1)/(M+P-1) with equal stages.

Deadlock: NCCL's send waits for the matching recv. In 1F1B's steady state a
stage sends an activation forward while its neighbour sends a gradient back;
each such crossing pair goes into one ``send_recv`` call (one NCCL group).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from .. import backend, optim
from ..tensor import Tensor, no_grad

SCHEDULES = ("gpipe", "1f1b")


class PipelineEngine:
    """Run one stage's part of each step; ``comm`` is the pipeline group (rank = stage)."""

    def __init__(self, stage, comm, schedule: str = "1f1b", timeline: bool = False):
        if schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if comm.size != stage.stages or comm.rank != stage.stage:
            raise ValueError(f"stage {stage.stage} of {stage.stages} on rank {comm.rank} of {comm.size}: "
                             "the pipeline group's rank must be the stage index")
        self.stage, self.comm, self.schedule = stage, comm, schedule
        self.prev = None if stage.is_first else stage.stage - 1
        self.next = None if stage.is_last else stage.stage + 1
        weight = next(iter(stage.parameters()))
        self.device, self.dtype = backend.device_of(weight.data), weight.data.dtype
        self.xp = backend.module_for(self.device)
        # the tied embedding's two copies (first and last stage) sum their gradients over this pair
        tied = stage.config.tie_embeddings and stage.stages > 1
        self.tied_comm = comm.split(0 if tied and (stage.is_first or stage.is_last) else None)
        if self.tied_comm is not None:   # both copies start as the first stage's (a stage built on its own
            self.tied_comm.broadcast(stage.wte.weight.data, root=0)   # device drew its copy apart)
        self.timeline = timeline
        self.events: list[tuple[str, int, float, float]] = []  # (kind, micro-batch, start, end) of the last step
        self.max_in_flight = 0

    # ------------------------------------------------------------ one step
    def train_step(self, micro_batches, checked: bool = False) -> float:
        """Forward and backward of every micro-batch (x, y) with this schedule; the step's mean loss.

        Gradients accumulate in the stage's ``p.grad`` (zero them before).
        Every rank passes the same micro-batches (only the first stage reads
        x, only the last y) and gets the same loss back, from the last stage.
        ``checked``: their ids were range-checked on the host (``check_token_batch``).
        """
        self.batches, self.M, self.checked = micro_batches, len(micro_batches), checked
        self.loss_grad = self.xp.asarray(1.0 / self.M, dtype=self.dtype)
        self.inputs, self.outputs, self.loss_sum = {}, {}, None
        self.events, self.max_in_flight, self.t0 = [], 0, time.perf_counter()
        (self._gpipe if self.schedule == "gpipe" else self._one_f_one_b)()
        if self.tied_comm is not None:
            self.tied_comm.all_reduce(self.stage.wte.weight.grad, "sum")  # d(embedding) + d(head)
        return self._loss_from_last_stage(self.loss_sum, self.M)

    def _gpipe(self) -> None:
        M = self.M
        for mb in range(M):
            self._send_forward(self._forward(mb, self._recv_forward(mb)))
        for mb in range(M):
            self._send_backward(self._backward(mb, self._recv_backward(mb)))

    def _one_f_one_b(self) -> None:
        M, P, s = self.M, self.stage.stages, self.stage.stage
        warmup = min(P - 1 - s, M)   # forwards before the first backward can arrive
        steady = M - warmup
        # warm-up: fill the pipe
        for mb in range(warmup):
            self._send_forward(self._forward(mb, self._recv_forward(mb)))
        # steady state: one forward, one backward
        x = self._recv_forward(warmup) if steady else None
        for i in range(steady):
            out = self._forward(warmup + i, x)
            grad = self._send_forward_recv_backward(out, i)
            grad_in = self._backward(i, grad)
            if i == steady - 1:
                self._send_backward(grad_in)
            else:
                x = self._send_backward_recv_forward(grad_in, warmup + i + 1)
        # cool-down: drain the backwards of the warm-up micro-batches
        for mb in range(steady, M):
            self._send_backward(self._backward(mb, self._recv_backward(mb)))

    # ------------------------------------------------------------ compute
    def _ids_checked(self):
        """Where ``train_step`` was told the ids were checked on the host: the ops skip their own
        checks (one GPU sync each, which would serialise the stages); otherwise nothing."""
        return backend.ids_checked_on_host() if self.checked else contextlib.nullcontext()

    def _forward(self, mb: int, x):
        start = self._now()
        inputs, targets = self.batches[mb]
        if self.stage.is_first:
            x = inputs                                           # token ids (b, T)
        if self.stage.is_last:
            with self._ids_checked():
                _, loss = self.stage(x, targets)
            self.loss_sum = loss.data if self.loss_sum is None else self.loss_sum + loss.data
            out = loss
        else:
            with self._ids_checked():
                out = self.stage(x)                              # (b, T, C)
        self.inputs[mb], self.outputs[mb] = x, out
        self.max_in_flight = max(self.max_in_flight, len(self.outputs))
        self._record("forward", mb, start)
        return out

    def _backward(self, mb: int, grad):
        """Backward of micro-batch ``mb`` from ``grad`` = dL/d(our output) (None on the last stage)."""
        start = self._now()
        out, x = self.outputs.pop(mb), self.inputs.pop(mb)
        if self.stage.is_last:
            # the loss: d(mean over M micro-batches)/d(this one) = 1/M (made on the device once per step:
            # a host scalar would be copied over at every micro-batch)
            out.backward(self.loss_grad)
        else:
            out.backward(grad)               # continue the chain rule from the received gradient
        self._record("backward", mb, start)
        return None if self.stage.is_first else x.grad   # dL/d(our input), for the previous stage

    # ------------------------------------------------------------ communication
    def _activation_buffer(self, mb: int):
        b, T = self.batches[mb][0].shape
        return self.xp.empty((b, T, self.stage.config.d_model), dtype=self.dtype)

    def _as_payload(self, tensor):
        return None if tensor is None else self.xp.ascontiguousarray(tensor.data, dtype=self.dtype)

    def _exchange(self, send, send_to, recv_mb, recv_from):
        """One paired send/recv (either side may be absent); returns the received array or None."""
        if (send is None or send_to is None) and (recv_mb is None or recv_from is None):
            return None
        start = self._now()
        buffer = self._activation_buffer(recv_mb) if recv_from is not None and recv_mb is not None else None
        self.comm.send_recv(send if send_to is not None else None, send_to,
                            buffer, recv_from if buffer is not None else None)
        if self.timeline:
            self.comm.synchronize()
        self._record("send/recv", -1 if recv_mb is None else recv_mb, start)
        return buffer

    def _recv_forward(self, mb):
        data = self._exchange(None, None, mb, self.prev)
        return None if data is None else Tensor(data, requires_grad=True)  # a leaf: its .grad goes back

    def _send_forward(self, out) -> None:
        if self.next is not None:
            self._exchange(self._as_payload(out), self.next, None, None)

    def _recv_backward(self, mb):
        return self._exchange(None, None, mb, self.next)

    def _send_backward(self, grad_in) -> None:
        if self.prev is not None:
            self._exchange(self.xp.ascontiguousarray(grad_in, dtype=self.dtype), self.prev, None, None)

    def _send_forward_recv_backward(self, out, mb):
        if self.next is None:
            return None
        return self._exchange(self._as_payload(out), self.next, mb, self.next)

    def _send_backward_recv_forward(self, grad_in, mb):
        send = None if self.prev is None else self.xp.ascontiguousarray(grad_in, dtype=self.dtype)
        data = self._exchange(send, self.prev, mb, self.prev)
        return None if data is None else Tensor(data, requires_grad=True)

    # ------------------------------------------------------------ loss, norm, eval
    def _loss_from_last_stage(self, loss_sum, count: int) -> float:
        """The last stage's mean loss, broadcast to every stage (each then decides alike)."""
        value = self.xp.zeros(1, dtype=np.float32)
        if self.stage.is_last:
            value += loss_sum                  # the float32 sum, divided on the host as Trainer does
        self.comm.broadcast(value, root=self.stage.stages - 1)
        self.comm.synchronize()  # NCCL: wait with a timeout, not in a blocking copy
        return float(value[0]) / count

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm over all stages (the tied matrix counted once); clip by it like one process."""
        duplicate = None
        if self.tied_comm is not None and self.stage.is_last:
            duplicate = self.stage.wte.weight.grad           # the first stage counts the tied matrix

        def whole_model(local_square: float) -> float:
            if duplicate is not None:
                local_square -= float(self.xp.vdot(duplicate.ravel(), duplicate.ravel()))
            total = self.xp.asarray([local_square], dtype=np.float64)
            self.comm.all_reduce(total, "sum")
            self.comm.synchronize()
            return float(total[0])

        return optim.clip_grad_norm_(list(self.stage.parameters()), max_norm, reduce_total=whole_model)

    def evaluate_loss(self, inputs, targets) -> float:
        """Forward only, one batch through the stages (no graph): the mean loss, on every rank."""
        self.batches = [(inputs, targets)]
        with no_grad():
            x = inputs if self.stage.is_first else Tensor(self._exchange(None, None, 0, self.prev))
            out = self.stage(x, targets) if self.stage.is_last else self.stage(x)
            if self.stage.is_last:
                return self._loss_from_last_stage(out[1].data, 1)
            self._send_forward(out)
        return self._loss_from_last_stage(None, 1)

    # ------------------------------------------------------------ timeline
    def _now(self) -> float:
        if self.timeline and self.device != "cpu":
            backend.synchronize(self.device)   # so host clocks bracket the GPU's work
        return time.perf_counter()

    def _record(self, kind: str, mb: int, start: float) -> None:
        if self.timeline:
            self.events.append((kind, mb, start - self.t0, self._now() - self.t0))

    def bubble_fraction(self) -> float:
        """This stage's idle share of the last step (recorded with ``timeline=True``)."""
        from .timeline import bubble_fraction  # noqa: PLC0415

        return bubble_fraction(self.events)
