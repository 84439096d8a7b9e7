"""A CPU training step, minillm next to PyTorch eager, interleaved in one process.

The ``minillm bench train`` configuration: a GPT-2-style model of 6 layers,
6 heads, 384 wide, context T=256, batch B=8, vocab 65, fp32, no dropout, tied
head, tanh GELU, AdamW (betas 0.9/0.99, decay 0.1 on matrices only) and a
gradient-norm clip at 1.0, on random tokens. The PyTorch model is the same
network written the usual way (nanoGPT: ``F.scaled_dot_product_attention``
with ``is_causal=True``, ``torch.optim.AdamW``); both libraries get the same
number of threads. Steps alternate, one minillm step then one PyTorch step,
so a load change on a shared machine hits both alike; the figure to read is
the ratio (per pair, then the median). The CPU time of each step (all
threads) is printed too: it is the work done, which a busy machine inflates
less than the wall time (though threads spinning while they wait count).
Then ``minillm bench train``'s own measurement runs in the same process, and
the peak RSS of each library training alone is measured in a fresh process
(VmHWM; within one process the second library would reuse heap pages the
first freed). ``--threads 1`` compares the work alone, without threads.

PyTorch comes from a throwaway environment, never from the project's:

    python3 -m venv /tmp/refenv --system-site-packages   # sees the system numpy, regex, tqdm
    /tmp/refenv/bin/pip install torch tiktoken           # PyPI; a CPU-only torch wheel is enough
    /tmp/refenv/bin/python benchmarks/cpu_vs_torch.py                # 10 pairs after 2 warm-up each
    /tmp/refenv/bin/python benchmarks/cpu_vs_torch.py --pairs 20 --threads 2

Check the load first (``uptime``): on a busy machine both figures drop; the
ratio is what stays comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

try:
    import torch  # noqa: E402
    import torch.nn as tnn  # noqa: E402
    import torch.nn.functional as TF  # noqa: E402
except ImportError:  # pragma: no cover - a hint, not a failure mode of the package
    sys.exit("cpu_vs_torch.py needs PyTorch: see this script's docstring for the throwaway venv")

import minillm  # noqa: E402
from minillm import backend  # noqa: E402
from minillm.data.dataset import TokenDataset  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.ops import common  # noqa: E402
from minillm.train.trainer import Trainer, TrainConfig  # noqa: E402


# ------------------------------------------------------------------ the PyTorch reference


class TorchBlock(tnn.Module):
    def __init__(self, c: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = tnn.LayerNorm(c), tnn.LayerNorm(c)
        self.c_attn, self.attn_proj = tnn.Linear(c, 3 * c), tnn.Linear(c, c)
        self.c_fc, self.mlp_proj = tnn.Linear(c, 4 * c), tnn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(TF.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(tnn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        c = cfg.d_model
        self.wte, self.wpe = tnn.Embedding(cfg.vocab_size, c), tnn.Embedding(cfg.context_length, c)
        self.h = tnn.ModuleList(TorchBlock(c, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = tnn.LayerNorm(c)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                tnn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                tnn.init.zeros_(p)

    def forward(self, ids, targets):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.h:
            x = block(x)
        logits = TF.linear(self.ln_f(x), self.wte.weight)            # tied head
        return TF.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class TorchStep:
    """One training step of the PyTorch model: forward, backward, clip, AdamW."""

    def __init__(self, cfg: GPTConfig, batch: int, seed: int):
        torch.manual_seed(seed)
        self.model = TorchGPT(cfg)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
        other = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and "wte" not in n and "wpe" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                     lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
        self.gen = torch.Generator().manual_seed(seed)
        self.cfg, self.batch = cfg, batch

    def __call__(self) -> float:
        t = self.cfg.context_length
        data = torch.randint(0, self.cfg.vocab_size, (self.batch, t + 1), generator=self.gen)
        loss = self.model(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# ------------------------------------------------------------------ minillm, as `minillm bench train` runs it


def minillm_trainer(cfg: GPTConfig, batch: int, seed: int) -> Trainer:
    backend.tune_cpu_allocator()
    minillm.manual_seed(seed)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=max(16 * cfg.context_length, 4096),
                                                  dtype=np.int64)
    data = TokenDataset(tokens, cfg.context_length, stride=1, val_fraction=0.0, seed=seed)
    return Trainer(GPT(cfg), TrainConfig(steps=100_000, batch_size=batch, warmup=0, progress=False), data)


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def blas_limit(threads: int):
    """With one thread, NumPy's BLAS gets one too; otherwise it is left as minillm sets it (the
    Trainer makes it single-threaded and shares out the work with its own threads)."""
    return backend.blas_threads(1) if threads == 1 else contextlib.nullcontext()


def peak_rss_mib() -> float:
    """This process's peak resident set size, MiB: VmHWM, which (unlike ``ru_maxrss``) starts
    afresh at exec, so a child started by a large parent does not inherit the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def timed(step, cpu_times: list) -> float:
    """Wall time of one step; its CPU time (all threads of the process) goes to ``cpu_times``."""
    start, cpu = time.perf_counter(), time.process_time()
    step()
    cpu_times.append(time.process_time() - cpu)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10, help="timed (minillm, PyTorch) step pairs (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both libraries (default 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench-steps", type=int, default=3,
                        help="then run minillm's own `bench train` for this many steps (0: skip; default 3)")
    parser.add_argument("--no-rss", action="store_true",
                        help="skip the peak-memory runs (each library alone, 3 steps, in a fresh process)")
    parser.add_argument("--alone", choices=["minillm", "torch"], help=argparse.SUPPRESS)   # the child runs
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    common.CPU_THREADS = args.threads          # minillm's own thread pool (elementwise work, products)
    cfg = GPTConfig(n_layer=6, n_head=6, d_model=384, context_length=args.context, vocab_size=65, dropout=0.0)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs; "
          f"threads {args.threads}; torch {torch.__version__}, numpy {np.__version__}")
    tokens = args.batch_size * args.context
    if args.alone:                                 # a child: one library, 3 steps, its peak RSS
        step = minillm_trainer(cfg, args.batch_size, args.seed).train_step if args.alone == "minillm" else \
            TorchStep(cfg, args.batch_size, args.seed)
        with blas_limit(args.threads):
            for _ in range(3):
                step()
        print(peak_rss_mib())
        return 0
    base = rss_mib()
    trainer = minillm_trainer(cfg, args.batch_size, args.seed)
    with blas_limit(args.threads):
        for _ in range(args.warmup):
            trainer.train_step()
        mini_rss = rss_mib() - base
        torch_step = TorchStep(cfg, args.batch_size, args.seed)
        base = rss_mib()
        for _ in range(args.warmup):
            torch_step()
        torch_rss = rss_mib() - base
        gc.collect()
        mini_times, torch_times, mini_cpu, torch_cpu = [], [], [], []
        for _ in range(args.pairs):
            mini_times.append(timed(trainer.train_step, mini_cpu))
            torch_times.append(timed(torch_step, torch_cpu))
    ratios = [t / m for m, t in zip(mini_times, torch_times)]          # >1: minillm faster
    m, t = statistics.median(mini_times), statistics.median(torch_times)
    print(f"minillm       {tokens / m:8,.0f} tokens/s  ({1000 * m:.0f} ms/step median, {1000 * min(mini_times):.0f} min; "
          f"CPU time {1000 * statistics.median(mini_cpu):.0f} ms/step)")
    print(f"PyTorch eager {tokens / t:8,.0f} tokens/s  ({1000 * t:.0f} ms/step median, {1000 * min(torch_times):.0f} min; "
          f"CPU time {1000 * statistics.median(torch_cpu):.0f} ms/step)")
    print(f"ratio minillm / PyTorch: {statistics.median(ratios):.2f}x median of {args.pairs} pairs "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}); best step vs best step "
          f"{min(torch_times) / min(mini_times):.2f}x")
    print(f"this process: peak RSS {peak_rss_mib():,.0f} MiB "
          f"(RSS growth over the warm-up: minillm {mini_rss:,.0f} MiB, then PyTorch {torch_rss:,.0f} MiB)")
    if not args.no_rss:
        peaks = {}
        for library in ("minillm", "torch"):
            child = subprocess.run([sys.executable, __file__, "--alone", library, "--threads", str(args.threads),
                                    "--batch-size", str(args.batch_size), "--context", str(args.context)],
                                   capture_output=True, text=True, check=True)
            peaks[library] = float(child.stdout.split()[-1])
        print(f"peak RSS of a process training alone (3 steps; both import both libraries): "
              f"minillm {peaks['minillm']:,.0f} MiB, "
              f"PyTorch {peaks['torch']:,.0f} MiB")
    if args.bench_steps:
        from minillm.bench.train import measure_train_step  # noqa: PLC0415

        with blas_limit(args.threads):   # `minillm bench train` itself, same process and config
            bench = measure_train_step(cfg, args.batch_size, steps=args.bench_steps, warmup=1, seed=args.seed)
        print(f"minillm bench train: {bench['tokens_per_s']:,.0f} tokens/s ({bench['ms_per_step_mean']:.0f} ms/step "
              f"mean of {args.bench_steps}); vs the PyTorch median above: {bench['tokens_per_s'] / (tokens / t):.2f}x")
    load = os.getloadavg()
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
