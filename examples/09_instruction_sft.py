"""Example 9: instruction fine-tuning (the book's chapter 7) with the Alpaca prompt.

Records {instruction, input, output} become "Below is an instruction ...
### Instruction: ... ### Response: ..." texts; the model learns to continue the
prompt with the response and an end-of-text. The collate pads each batch with
end-of-text, keeps the first one as a target and ignores the rest
(``--mask-prompt``: ignore the prompt's targets too). Split 85/5/10; after
training, the responses to the test instructions go to
RUN_DIR/test-responses.json. Ctrl-C stops after the current step and keeps
the checkpoint (``minillm finetune sft ... --resume`` continues it).

    minillm train                                    # once: runs/pydoc
    python examples/09_instruction_sft.py            # 3 epochs, about a minute on 2 cores

The small pydoc model (1M parameters, context 128) learns the format, not the
answers: its validation loss falls and its responses are short sentences in the
right place. From GPT-2 weights (``minillm finetune sft --hf DIR``) the
responses become sensible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minillm as mm  # noqa: E402
from minillm.commands.argtypes import positive_float, positive_int  # noqa: E402
from minillm.finetune import FinetuneConfig, finetune, load_language_model  # noqa: E402
from minillm.train import has_checkpoint  # noqa: E402


SOURCE = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
          "instruction-data.json")


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(ROOT / "runs" / "pydoc"), help="the pretrained run (default runs/pydoc)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "instruction-data.json"),
                        help=f"a JSON list of {{instruction, input, output}} records (the book's: {SOURCE})")
    parser.add_argument("--out", default=str(ROOT / "runs" / "sft"))
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--lr", type=positive_float, default=5e-4)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--mask-prompt", action="store_true", help="learn the response tokens only")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not (Path(args.base) / "checkpoint.json").is_file():
        parser.error(f"no pretrained run in {args.base}: run `minillm train` first (it writes runs/pydoc)")
    if not Path(args.data).is_file():
        parser.error(f"no data file {args.data}: download the book's from {SOURCE} and pass --data FILE")
    if has_checkpoint(args.out):
        parser.error(f"{args.out} already holds a run: pass another --out (or delete it)")

    mm.manual_seed(0)
    gpt, tokenizer = load_language_model(args.base)
    config = FinetuneConfig("sft", args.data, epochs=args.epochs, truncate=True, mask_prompt=args.mask_prompt,
                            max_new_tokens=args.max_new_tokens)
    result = finetune(gpt, tokenizer, config, {"batch_size": args.batch_size, "lr": args.lr,
                                               "min_lr": args.lr / 10, "progress": not args.quiet},
                      run_dir=args.out, say=lambda message: None if args.quiet else print(message))
    if result.interrupted:                      # Ctrl-C: the checkpoint is saved, no test responses
        print(f"stopped at step {result.step}; the checkpoint is in {args.out}", file=sys.stderr)
        raise SystemExit(130)
    curve = [h["val_loss"] for h in result.history]
    print("validation loss per epoch (step 0 first): " + " -> ".join(f"{v:.3f}" for v in curve))
    for record in result.responses[:3]:
        print(f"\n### Instruction: {record['instruction']}\n### Expected: {record['output']}\n"
              f"### Model: {record['model_response']}")
    return curve


if __name__ == "__main__":
    main()
