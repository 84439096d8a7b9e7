"""A training step's forward and backward, captured once as a CUDA graph and replayed.

Why. minillm issues every GPU kernel from Python. For gpt2-124m (B=8, T=1024) one
forward and backward is a few thousand launches, and in bf16 the host needs longer to
issue them than the H200 needs to run them: the GPU waits on Python. A CUDA graph
records the launches of one forward+backward once; replaying it is one call, and the
GPU then runs the kernels back to back.

What is captured: the forward and backward of a step's ``grad_accum`` micro-batches,
reading the token ids from static device buffers and writing the summed loss and every
parameter's gradient into arrays that keep their addresses from replay to replay.
What is not: clipping, the optimizer and the fp16 loss scaler. They run as before after
each replay (a handful of launches), so they keep their host-side checks (a non-finite
gradient norm stops before the update) and their per-step numbers (the learning rate,
Adam's bias corrections, the loss scale) instead of freezing them into the graph.

A captured step follows four rules:

- **No host sync inside.** A capture records, it does not run: nothing can be read
  back. The embedding's and the cross-entropy's token-id range checks (one device->host
  read each) are skipped while capturing (``backend.ids_checked_on_host()``); ``replay`` checks
  the ids on the host instead, before copying them into the static buffers.
- **Fixed addresses.** Memory allocated during the capture comes from a private CuPy
  memory pool that nothing else allocates from, kept as long as the graph. A block
  freed and taken again inside the capture is taken again in the same order at every
  replay (one stream, in order), so the pool needs about the eager step's peak.
- **Same shapes, caches warm.** The graph is captured after one eager step of the same
  shapes, so every lazily built table (causal masks, rotary tables, compiled kernels,
  cuBLAS's workspace) exists before the capture starts.
- **No fresh randomness.** A replay would repeat the captured dropout masks, so a model
  with dropout > 0 is refused.

The backward's seed d(S·loss/grad_accum)/d(loss) = S/grad_accum (S the fp16 loss scale,
1 otherwise) is a device scalar written before each replay, so the scaler still works.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .. import backend, precision
from ..tensor import Tensor


class GraphCaptureError(RuntimeError):
    """The step could not be captured as a CUDA graph (the message says why and what to do)."""


def check_graph_capturable(model) -> None:
    """Raise ValueError, in the user's words, when ``model`` cannot train as a captured step."""
    rates = [getattr(m, "p", 0.0) for m in model.modules() if type(m).__name__ == "Dropout"]
    rate = max([getattr(getattr(model, "config", None), "dropout", 0.0) or 0.0, *rates])
    if rate > 0:
        raise ValueError(f"--cuda-graph needs --dropout 0: a captured step would replay the same dropout masks "
                         f"at every step (dropout is {rate})")


def check_token_batch(inputs, targets, vocab_size: int) -> None:
    """Every id and target in [0, vocab_size) (targets may be -100, ignored), checked on the host
    (NumPy arrays, before they go to the GPU): what F.embedding and F.cross_entropy check on the
    device, one host sync each. Callers that skip those device checks (a captured step; the
    pipeline's stages, minillm/distributed/pipeline.py) check here instead."""
    for name, array, allowed in (("token id", inputs, None), ("target id", targets, -100)):
        values = array if allowed is None else array[array != allowed]
        if values.size and (values.min() < 0 or values.max() >= vocab_size):
            bad = values.min() if values.min() < 0 else values.max()
            raise ValueError(f"{name} {int(bad)} is out of range for a vocabulary of {vocab_size}")


def _layout(batches) -> list[tuple]:
    """(shape, dtype) of every array of every micro-batch: what a graph is captured for."""
    return [tuple((a.shape, np.dtype(a.dtype)) for a in batch) for batch in batches]


class CapturedForwardBackward:
    """``loss_fn``'s forward and backward over fixed-shape micro-batches, as one CUDA graph.

        captured = CapturedForwardBackward(model, loss_fn, batches, "bf16", vocab_size=V)
        loss_sum = captured.replay(batches, seed)   # device scalar; p.grad set for every parameter

    ``batches``: a list of tuples of integer NumPy arrays (inputs, targets, ...), one tuple
    per micro-batch, used here for their shapes and dtypes. Every replay takes batches of
    exactly these shapes, (inputs, targets, ...) with inputs and targets checked on the host
    to lie in [0, vocab_size) (a target may also be -100, cross-entropy's ignore index).
    """

    def __init__(self, model, loss_fn: Callable, batches: Sequence[tuple], precision_name: str, vocab_size: int,
                 device: str) -> None:
        import cupy  # noqa: PLC0415

        from ..kernels.matmul import prepare_capture  # noqa: PLC0415

        self.model, self.loss_fn, self.precision_name = model, loss_fn, precision_name
        self.vocab_size, self.device = int(vocab_size), device
        self.shapes = _layout(batches)
        with backend.device_context(device):
            self.stream = cupy.cuda.Stream(non_blocking=True)
            # the static inputs and the backward seed: written before every replay, read by the graph
            self.inputs = [tuple(cupy.empty(shape, dtype=dtype) for shape, dtype in batch) for batch in self.shapes]
            self.seed = cupy.zeros((), dtype=backend.get_default_dtype())
            self.pool = cupy.cuda.MemoryPool()          # the graph's own memory, never shared
            cupy.get_default_memory_pool().free_all_blocks()   # the eager step's cached blocks go back
            for p in model.parameters():
                p.grad = None                           # captured as "fresh gradients", like after zero_grad
            self.stream.wait_event(cupy.cuda.get_current_stream().record())
            with self.stream:
                prepare_capture()                       # cuBLAS: this stream and a fixed workspace
                self.stream.synchronize()
                cupy.cuda.set_allocator(self.pool.malloc)
                try:
                    with backend.ids_checked_on_host():
                        self.stream.begin_capture(getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", 2))
                        try:
                            self.loss_sum = self._forward_backward()
                        except Exception as error:
                            _abandon_capture(self.stream)
                            raise GraphCaptureError(
                                f"--cuda-graph: this step cannot be captured as a CUDA graph ({error}); "
                                f"train without --cuda-graph") from error
                        try:
                            self.graph = self.stream.end_capture()
                        except Exception as error:
                            raise GraphCaptureError(
                                f"--cuda-graph: the captured step is invalid ({error}); "
                                f"train without --cuda-graph") from error
                finally:
                    cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)
        # the gradients the graph writes, at fixed addresses: handed back to the parameters after each replay
        self.grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]
        self.weights = [(p, p.data) for p in model.parameters()]   # the arrays the graph reads
        for p, _ in self.grads:
            p.grad = None   # nothing ran yet: they hold no values until the first replay

    def _forward_backward(self):
        loss_sum = None
        with precision.use_precision(self.precision_name):
            for batch in self.inputs:
                loss = self.loss_fn(self.model, batch)
                loss.backward(Tensor(self.seed))       # d(seed · loss): seed = S / grad_accum
                loss_sum = loss.data if loss_sum is None else loss_sum + loss.data
        return loss_sum

    def reads_current_weights(self) -> bool:
        """Whether every parameter still holds the array the graph was captured with (an in-place
        update, like AdamW's, is seen by the next replay; a replaced array, e.g. by ``model.to`` or a
        checkpoint loaded into new arrays, needs a new capture)."""
        return all(p.data is array for p, array in self.weights)

    def matches(self, batches) -> bool:
        """Whether ``batches`` have the shapes and dtypes this graph was captured for."""
        return _layout(batches) == self.shapes

    def replay(self, batches, seed: float):
        """Copy ``batches`` (host arrays) in, replay the graph; returns the summed loss (a device scalar).

        Afterwards every parameter the graph differentiates has its ``.grad`` (fixed arrays,
        overwritten by the next replay: read or update before replaying again)."""
        import cupy  # noqa: PLC0415

        if not self.matches(batches):
            raise ValueError("--cuda-graph: every step's batches must have the shapes of the first "
                             f"(captured {self.shapes}); train without --cuda-graph for varying shapes")
        for inputs, targets, *_ in batches:
            check_token_batch(inputs, targets, self.vocab_size)
        with backend.device_context(self.device):
            caller = cupy.cuda.get_current_stream()
            self.stream.wait_event(caller.record())    # the previous optimizer step has updated the weights
            with self.stream:
                for static, batch in zip(self.inputs, batches):
                    for buffer, array in zip(static, batch):
                        buffer.set(np.ascontiguousarray(array), stream=self.stream)
                self.seed.fill(seed)
                self.graph.launch(self.stream)
            caller.wait_event(self.stream.record())    # clipping and the optimizer read the gradients after
        for p, grad in self.grads:
            p.grad = grad
        return self.loss_sum

    def memory_bytes(self) -> int:
        """Bytes the graph's private pool holds (its activations and gradients)."""
        return self.pool.total_bytes()


def _abandon_capture(stream) -> None:
    """End a capture that failed half-way, so the stream is usable again (the graph is dropped)."""
    try:
        stream.end_capture()
    except Exception:  # noqa: BLE001 - the capture is already invalid; the original error is raised
        pass


def host_batches(batches) -> list[tuple[Any, ...]]:
    """The micro-batches as tuples of NumPy arrays (from NumPy or CuPy arrays)."""
    return [tuple(backend.to_numpy(a) for a in batch) for batch in batches]
