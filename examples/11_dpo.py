"""Example 11: preference tuning with DPO, after instruction tuning (the book's chapter 7 bonus).

First SFT on the instruction data (example 9), then one epoch of DPO on the
same instructions with a chosen (polite) and a rejected (rude) response each.
The reference is a frozen copy of the SFT model; the loss is
−log σ(β((π_c − π_r) − (ref_c − ref_r))) over the response tokens' log-probabilities.
Every ``--eval-interval`` steps the held-out pairs are scored: the chosen and
rejected rewards β(π − ref), their margin, and the reward accuracy (0.5 at the
start, where policy = reference).

    minillm train                                    # once: runs/pydoc
    python examples/11_dpo.py                        # SFT 3 epochs, then DPO 1 epoch: about a minute
    python examples/11_dpo.py --sft runs/sft         # DPO only, from an SFT run you already have

Ctrl-C stops after the current step and keeps that stage's checkpoint (``minillm finetune sft|dpo
... --resume`` continues it; ``--sft OUT/sft`` starts DPO from a finished SFT run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minillm as mm  # noqa: E402
from minillm.commands.argtypes import non_negative_int, positive_float, positive_int  # noqa: E402
from minillm.finetune import FinetuneConfig, finetune, load_language_model  # noqa: E402
from minillm.train import has_checkpoint  # noqa: E402


BOOK = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07"
SOURCES = {"--instructions": f"{BOOK}/01_main-chapter-code/instruction-data.json",
           "--preferences": f"{BOOK}/04_preference-tuning-with-dpo/instruction-data-with-preference.json"}


def stop_if_interrupted(result, run_dir: Path) -> None:
    """Ctrl-C during a stage: its checkpoint is saved; stop here (exit 130) rather than go on."""
    if result.interrupted:
        print(f"stopped at step {result.step}; the checkpoint is in {run_dir}", file=sys.stderr)
        raise SystemExit(130)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(ROOT / "runs" / "pydoc"), help="the pretrained run (default runs/pydoc)")
    parser.add_argument("--sft", help="an SFT run to start DPO from (default: run SFT first, into OUT/sft)")
    parser.add_argument("--instructions", default=str(ROOT.parent / "shared" / "data" / "instruction-data.json"),
                        help=f"the SFT records (from {SOURCES['--instructions']})")
    parser.add_argument("--preferences",
                        default=str(ROOT.parent / "shared" / "data" / "instruction-data-with-preference.json"),
                        help=f"the same records with 'chosen' and 'rejected' (from {SOURCES['--preferences']})")
    parser.add_argument("--out", default=str(ROOT / "runs" / "dpo-example"))
    parser.add_argument("--sft-epochs", type=positive_int, default=3)
    parser.add_argument("--sft-lr", type=positive_float, default=5e-4)
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="DPO learning rate")
    parser.add_argument("--beta", type=positive_float, default=0.1)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--eval-interval", type=non_negative_int, default=20, help="0: evaluate at the end only")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    say = (lambda message: None) if args.quiet else print
    out = Path(args.out)
    # everything a stage needs is checked before the first one starts
    if args.sft is None and not has_checkpoint(args.base):
        parser.error(f"no pretrained run in {args.base}: run `minillm train` first (it writes runs/pydoc)")
    if args.sft is not None and not has_checkpoint(args.sft):
        parser.error(f"--sft {args.sft}: no SFT run there (example 9 or `minillm finetune sft` writes one)")
    for option, path in ([] if args.sft else [("--instructions", args.instructions)]) + [
            ("--preferences", args.preferences)]:
        if not Path(path).is_file():
            parser.error(f"no data file {path}: download the book's from {SOURCES[option]} and pass {option} FILE")
    for run_dir in ([] if args.sft else [out / "sft"]) + [out / "dpo"]:
        if has_checkpoint(run_dir):
            parser.error(f"{run_dir} already holds a run: pass another --out (or delete it)")

    sft_run = args.sft
    if sft_run is None:
        mm.manual_seed(0)
        gpt, tokenizer = load_language_model(args.base)
        sft = finetune(gpt, tokenizer, FinetuneConfig("sft", args.instructions, epochs=args.sft_epochs,
                                                      truncate=True, max_new_tokens=32),
                       {"batch_size": args.batch_size, "lr": args.sft_lr, "min_lr": args.sft_lr / 10,
                        "progress": not args.quiet}, run_dir=out / "sft", say=say)
        stop_if_interrupted(sft, out / "sft")
        print("SFT validation loss: " + " -> ".join(f"{h['val_loss']:.3f}" for h in sft.history))
        sft_run = out / "sft"

    mm.manual_seed(0)
    gpt, tokenizer = load_language_model(sft_run)
    result = finetune(gpt, tokenizer, FinetuneConfig("dpo", args.preferences, epochs=1, beta=args.beta, truncate=True),
                      {"batch_size": args.batch_size, "lr": args.lr, "min_lr": args.lr / 10,
                       "eval_interval": args.eval_interval, "progress": not args.quiet},
                      run_dir=out / "dpo", say=say)
    stop_if_interrupted(result, out / "dpo")
    print("\n| step | reward accuracy | chosen reward | rejected reward | margin | DPO loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for h in result.history:
        print(f"| {h['step']} | {h['reward_acc']:.3f} | {h['chosen_reward']:.3f} | {h['rejected_reward']:.3f} | "
              f"{h['margin']:.3f} | {h['val_loss']:.4f} |")
    return result.history


if __name__ == "__main__":
    main()
