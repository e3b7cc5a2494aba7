"""`lvlmlp import-legacy`: the paper's output JSON lines (LVLM-LP) converted into a run folder."""

from __future__ import annotations

import argparse

from lvlmlp.ranges import COUNT


def register(subparsers: argparse._SubParsersAction) -> None:
    imp = subparsers.add_parser("import-legacy", help="convert the paper's output JSON lines into a run folder")
    imp.add_argument("file", help="the paper's JSON lines (image, question, label, response, output_ids, logits)")
    imp.add_argument("--out", required=True, help="run folder to write (new or empty; re-running resumes it)")
    imp.add_argument("--vocab-size", type=COUNT, help="expected logits per token (default: the first line's)")
    imp.add_argument("--max-tokens", type=COUNT, help="keep at most this many tokens' logits per row (default: all)")
    imp.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored logits dtype (default float32)")
    imp.add_argument("--model", help="model path or hub id to record (default: the file's model_name)")
    imp.add_argument("--judged", metavar="MathV_output.json",
                     help="MathVista: the scored output file whose true_false labels a MathV.jsonl import")
    imp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.extraction.legacy import import_legacy
    from lvlmlp.outputs import check_output

    check_output(args.out, "run", {"FILE": args.file, "--judged": args.judged})
    imported = import_legacy(args.file, args.out, vocab_size=args.vocab_size, max_tokens=args.max_tokens,
                             dtype=args.dtype, model=args.model, judged=args.judged)
    print(f"imported {len(imported)} rows -> {imported.path}")
    return 0
