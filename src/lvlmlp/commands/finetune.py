"""`lvlmlp finetune`: LoRA-finetune a VLM on a task's train split (or a manifest), the paper's comparison with
probing. Writes OUT/model (adapter merged; `lvlmlp extract --model OUT/model` loads it), OUT/adapter and
OUT/train_log.jsonl; re-running the same command resumes after the last finished epoch."""

from __future__ import annotations

import argparse

from lvlmlp.commands._args import (
    add_model_arguments,
    add_task_arguments,
    rows_from_args,
    silence_progress_bars,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="LoRA-finetune a VLM on a task's train split (finetuning vs probing)",
                              description="LoRA-finetune a VLM on the rows of --split (default: train) with the "
                                          "prompt extraction uses; the loss reads the answer tokens only.")
    p.add_argument("--data", help="JSON-lines manifest (rows of --split, default train, when rows name a split)")
    add_task_arguments(p)  # --task, --data-root, --split, --prompt-style, --per-class, --limit, --seed (also training)
    add_model_arguments(p)
    p.add_argument("--answers", default=None, metavar="LABEL1,LABEL0",
                   help="target answers by label, e.g. Yes,No (default: the task and prompt style's own answer "
                        "words; a row's 'target' field overrides)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (constant)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="Linear layers of the language model to adapt, comma-separated, or all-linear")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--out", required=True, help="output folder; re-running the same command resumes it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (ours and transformers')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.steering.guard import parse_answers
    from lvlmlp.study.finetune import Settings, default_answers, finetune, row_targets

    # the train split by default (a manifest without splits is used whole)
    rows, task_template, source = rows_from_args(args, "finetune", seed_used=True, default_split="train")
    template = args.prompt_template or task_template
    answers = parse_answers(args.answers) or default_answers(args.task, args.prompt_style)
    targets = row_targets(rows, answers, source)  # every row's target before the model loads
    settings = Settings(epochs=args.epochs, lr=args.lr, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        seed=0 if args.seed is None else args.seed,
                        target_modules=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    settings.check()
    if args.no_progress:
        silence_progress_bars()
    backend = Backend(args.model, device=args.device, dtype=args.dtype, prompt_template=template,
                      raw_prompt=args.raw_prompt, system_prompt=args.system_prompt,
                      trust_remote_code=args.trust_remote_code)
    summary = finetune(backend, rows, targets, args.out, settings, progress=not args.no_progress)
    losses = ", ".join(f"{x:.4f}" for x in summary["epoch_loss"])
    print(f"{args.out}: {len(rows)} rows, {summary['epochs_done']} epochs, mean loss per epoch {losses}")
    print(f"model -> {args.out}/model (adapter -> {args.out}/adapter, log -> {args.out}/train_log.jsonl)")
    return 0
