"""Example 5: pretrain a character-level GPT on Shakespeare (nanoGPT's CPU recipe).

tinyshakespeare (1.1 MB) at byte level (vocab 256), first 90% to train, last
10% to validate; a GPT of 4 layers, 4 heads, 128 dims, context 64; batches of
12 windows; 2000 AdamW steps (lr 1e-3, betas 0.9/0.99, weight decay 0.1),
100 warmup steps then cosine to 1e-4, gradient clip 1.0, no dropout, seed
1337. nanoGPT (PyTorch) reaches a validation loss of about 2.06 with this
recipe in about 93 s on a 2-core CPU; the target here is <= 2.10.

    python examples/05_pretrain_shakespeare.py                 # the full recipe, a few minutes
    python examples/05_pretrain_shakespeare.py --steps 20      # a smoke test
    python examples/05_pretrain_shakespeare.py --resume        # continue runs/shakespeare
    python examples/05_pretrain_shakespeare.py --arch llama    # a Llama-style twin, same parameter count

The final validation loss is measured on EVERY non-overlapping window of
the validation text, not on a sample. Checkpoints, metrics.jsonl and the
tokenizer go to --out (default runs/shakespeare), a run directory like
``minillm train`` writes: ``minillm generate --run runs/shakespeare --prompt
"ROMEO:"`` samples from it, ``minillm plot runs/shakespeare`` draws its curves.
Ctrl-C stops after the current step and saves a checkpoint; --resume continues.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillm as mm  # noqa: E402
from minillm.backend import parse_device  # noqa: E402
from minillm.commands.argtypes import device, non_negative_int, positive_int  # noqa: E402
from minillm.data.dataset import TokenDataset, encode_documents  # noqa: E402
from minillm.models import GPT, GPTConfig, llama_style  # noqa: E402
from minillm.tokenizer import BPETokenizer  # noqa: E402
from minillm.train import TrainConfig, Trainer, has_checkpoint  # noqa: E402
from minillm.train.run import TOKENIZER_FILE, print_samples  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
SOURCE = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help=f"tinyshakespeare.txt (from {SOURCE})")
    parser.add_argument("--steps", type=positive_int, default=2000)
    parser.add_argument("--batch-size", type=positive_int, default=12)
    parser.add_argument("--context", type=positive_int, default=64)
    parser.add_argument("--n-layer", type=positive_int, default=4)
    parser.add_argument("--n-head", type=positive_int, default=4)
    parser.add_argument("--d-model", type=positive_int, default=128)
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2",
                        help="llama: rotary positions, RMSNorm, SwiGLU, no biases, --n-kv-head key/value heads, "
                             "its MLP widened to the GPT-2-style model's parameter count")
    parser.add_argument("--n-kv-head", type=positive_int, default=None,
                        help="for --arch llama (default: n_head / 2 when even)")
    parser.add_argument("--eval-interval", type=non_negative_int, default=250, help="0: no evaluation during training")
    parser.add_argument("--eval-batches", type=positive_int, default=20,
                        help="random val batches per evaluation during training")
    parser.add_argument("--device", type=device, default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/shakespeare"))
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: download tinyshakespeare from {SOURCE} and pass --data FILE")
    if has_checkpoint(args.out) and not args.resume:
        raise SystemExit(f"{args.out} already holds a run: pass --resume, or another --out")
    if args.resume and not has_checkpoint(args.out):
        raise SystemExit(f"--resume: no run in {args.out} to continue (start one without --resume)")

    # the model, the recipe and the device, checked before any work (e.g. --d-model must split into
    # --n-head heads; --device cuda needs CuPy and a GPU)
    try:
        parse_device(args.device)
        model_config = GPTConfig(vocab_size=256, context_length=args.context, n_layer=args.n_layer,
                                 n_head=args.n_head, d_model=args.d_model, dropout=0.0)
        if args.arch == "llama":
            halved = args.n_head // 2 if args.n_head % 2 == 0 else args.n_head          # grouped-query attention
            model_config = llama_style(model_config, n_kv_head=args.n_kv_head or halved)
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, min_lr=1e-4,
                             warmup=min(100, args.steps // 10), weight_decay=0.1, betas=(0.9, 0.99), clip=1.0,
                             eval_interval=args.eval_interval, eval_batches=args.eval_batches,
                             checkpoint_interval=500, seed=1337, device=args.device, progress=not args.quiet)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))

    # data: bytes -> windows of 64 (every start position is a training window)
    tokenizer = BPETokenizer.bytes()
    tokens = encode_documents(args.data.read_text(encoding="utf-8"), tokenizer)
    data = TokenDataset(tokens, args.context, stride=1, val_fraction=0.1, seed=1337)
    full_val = TokenDataset(tokens, args.context, stride=args.context, val_fraction=0.1)  # same split, no overlap
    print(f"{len(tokens):,} tokens: {len(data.train.tokens):,} train, {len(data.val.tokens):,} val")

    mm.manual_seed(1337)
    model = GPT(model_config)
    if not args.resume:   # the tokenizer beside the checkpoints: `minillm generate --run` reads it
        args.out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(args.out / TOKENIZER_FILE)
    trainer = Trainer(model, config, data, run_dir=args.out, tokenizer={"spec": "bytes", "file": TOKENIZER_FILE})
    if args.resume:
        try:
            print(f"resuming at step {trainer.resume()}")
        except (ValueError, RuntimeError) as error:    # e.g. other sizes than the run was started with
            raise SystemExit(f"--resume: {error}") from None
        if trainer.step >= config.steps:
            raise SystemExit(f"{args.out} is already at step {trainer.step} of {config.steps}: "
                             f"pass a larger --steps to train further")
    print(f"{args.arch}: {model.num_parameters():,} parameters, {config.steps} steps of {config.batch_size} x "
          f"{args.context} tokens")

    start = time.perf_counter()
    result = trainer.fit()
    train_time = time.perf_counter() - start
    if result.interrupted:          # Ctrl-C: fit() saved a checkpoint after the current step
        print(f"stopped at step {result.step} of {config.steps}; continue with --resume --out {args.out}",
              file=sys.stderr)
        raise SystemExit(130)
    val_loss = trainer.evaluate(max_batches=None, data=full_val)
    print(f"trained {result.step} steps in {train_time:.0f} s ({result.tokens_per_second:,.0f} tokens/s); "
          f"val loss on all {len(full_val.val):,} validation windows: {val_loss:.4f} (nanoGPT: ~2.06; target <= 2.10)")
    print_samples(model, tokenizer, ["ROMEO:\n"], 1, max_new_tokens=args.context - 7, temperature=0.8, seed=1337)
    return val_loss


if __name__ == "__main__":
    main()
