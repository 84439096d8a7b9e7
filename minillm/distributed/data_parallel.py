"""Data parallelism: D replicas of the model, each on its own shard of every global batch.

One optimizer step with a global batch of B windows on D ranks:

    rank d takes windows [d·B/D, (d+1)·B/D) of the batch     (every rank draws the same global batch)
    loss_d = mean cross-entropy over its B/D windows; backward -> g_d
    g = (1/D) Σ_d g_d        all-reduce ("avg") of every gradient   = the gradient of the global mean loss
    clip and AdamW on every rank with the same g                  -> replicas stay identical

so D ranks compute exactly the single-process update. What a step sends: the
gradients, once (a ring all-reduce moves 2·(D−1)/D of their bytes per rank:
497 MB of fp32 gradients for gpt2-124m -> ~497 MB per rank per step at D = 2).

Buckets and overlap. The gradients are reduced in buckets of about
``bucket_mb`` megabytes, in the reverse of the model's parameter order (the
order the backward produces them: the last block first). The engine calls
``register_post_accumulate_grad_hook`` hooks the moment a parameter's gradient
is final in the backward walk; when every parameter of a bucket has reported,
the bucket is packed into one flat buffer and its all-reduce is issued at once,
while the backward goes on with the earlier layers. On the GPU the all-reduce
runs on a side stream (waiting for the gradients with an event), so NCCL moves
bucket k while the kernels of layer k−1's backward run; ``finish()`` makes the
compute stream wait for it. Each parameter's ``.grad`` then becomes a view into
its bucket: the averaged gradient, with no copy back.

With gradient accumulation only the last micro-batch's backward reduces
(``sync = False`` before the others, like PyTorch's ``no_sync``): the summed
gradient is reduced once.
"""

from __future__ import annotations

from .. import backend


class _Bucket:
    """Parameters whose gradients travel together, and the flat buffer they are packed into."""

    def __init__(self, params: list):
        self.params = params
        self.numel = sum(p.data.size for p in params)
        self.buffer = None          # (numel,) on the parameters' device, made on first use
        self.ready = 0              # parameters whose gradient is final in this backward
        self.reduced = False        # the all-reduce has been issued this step


class DataParallel:
    """Average gradients over the ranks of ``comm`` (a data-parallel group), bucket by bucket.

        ddp = DataParallel(model.parameters(), mesh.dp)
        inputs, targets = ddp.shard_batch((inputs, targets))   # this rank's rows of the global batch
        loss.backward()                                         # buckets are all-reduced as they fill
        ddp.finish()                                            # every .grad is now the global average
    """

    def __init__(self, params, comm, bucket_mb: float = 25.0):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        self.comm = comm
        self.params = [p for p in params if p.requires_grad]
        self.sync = True
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        current, current_bytes, limit = [], 0, bucket_mb * 2**20
        for p in reversed(self.params):                  # backward order: last layers first
            current.append(p)
            current_bytes += p.data.nbytes
            if current_bytes >= limit:
                self._add_bucket(current)
                current, current_bytes = [], 0
        if current:
            self._add_bucket(current)
        self._stream = None
        self._cupy = None
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_gradient_final)

    def _add_bucket(self, params: list) -> None:
        bucket = _Bucket(params)
        self.buckets.append(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket

    # ---------------------------------------------------------------- batches
    def shard_batch(self, batch):
        """This rank's rows of each array of a global batch: rows [r·B/D, (r+1)·B/D)."""
        size, rank = self.comm.size, self.comm.rank
        rows = batch[0].shape[0]
        if rows % size:
            raise ValueError(f"the global batch of {rows} windows does not divide over {size} data-parallel "
                             f"ranks: choose a --batch-size that is a multiple of --dp {size}")
        per_rank = rows // size
        return tuple(array[rank * per_rank:(rank + 1) * per_rank] for array in batch)

    # ---------------------------------------------------------------- reduction
    def _on_gradient_final(self, param) -> None:
        if not self.sync:
            return
        bucket = self._bucket_of[id(param)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._reduce(bucket)

    def _reduce(self, bucket: _Bucket) -> None:
        """Pack the bucket's gradients (zeros where none arrived), issue the all-reduce, point .grad at it."""
        first = bucket.params[0].data
        xp = backend.array_module(first)
        if bucket.buffer is None:
            with backend.device_context(backend.device_of(first)):
                bucket.buffer = xp.empty(bucket.numel, dtype=first.dtype)
        offset = 0
        for p in bucket.params:
            n = p.data.size
            if p.grad is None:
                bucket.buffer[offset:offset + n] = 0
            else:
                bucket.buffer[offset:offset + n] = p.grad.reshape(-1)
            offset += n
        self._all_reduce(bucket.buffer)
        offset = 0
        for p in bucket.params:                        # the gradient is now (a view of) the average
            n = p.data.size
            p.grad = bucket.buffer[offset:offset + n].reshape(p.data.shape)
            offset += n
        bucket.reduced = True

    def _all_reduce(self, buffer) -> None:
        if backend.device_of(buffer) == "cpu":
            self.comm.all_reduce(buffer, op="avg")     # blocking on the CPU transport
            return
        cupy = self._cupy = backend.module_for(backend.device_of(buffer))
        if self._stream is None:
            self._stream = cupy.cuda.Stream(non_blocking=True)
        packed = cupy.cuda.Event(disable_timing=True)
        packed.record()                                # on the compute stream, after the packing copies
        self._stream.wait_event(packed)
        with self._stream:                             # NCCL enqueues on the current stream: the side one
            self.comm.all_reduce(buffer, op="avg")

    def finish(self) -> None:
        """Reduce the buckets no hook completed (parameters the loss did not reach), then wait for all.

        Call once per optimizer step, after the last backward. On the GPU the
        compute stream then waits for the side stream, and the communicator's
        pending operations are checked (a dead peer raises CommError within
        its timeout instead of hanging the next host sync).
        """
        for bucket in self.buckets:
            if not bucket.reduced:
                self._reduce(bucket)
        for bucket in self.buckets:
            bucket.ready, bucket.reduced = 0, False
        if self._stream is not None:
            done = self._cupy.cuda.Event(disable_timing=True)
            done.record(self._stream)
            self._cupy.cuda.get_current_stream().wait_event(done)
        self.comm.synchronize()

    def bytes_per_step(self) -> int:
        """Gradient bytes each rank all-reduces per optimizer step."""
        return sum(p.data.nbytes for p in self.params)
