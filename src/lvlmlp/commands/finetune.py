"""`lvlmlp finetune`: LoRA-finetune a VLM on a task's train split (or a manifest), the paper's comparison with
probing. Writes OUT/model (adapter merged; `lvlmlp extract --model OUT/model` loads it), OUT/adapter and
OUT/train_log.jsonl; re-running the same command resumes after the last finished epoch."""

from __future__ import annotations

import argparse

from lvlmlp.commands._args import (
    add_model_arguments,
    add_task_arguments,
    backend_spec,
    input_flags,
    rows_from_args,
    silence_progress_bars,
)
from lvlmlp.errors import LvlmlpError
from lvlmlp.ranges import COUNT, POSITIVE, Range


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="LoRA-finetune a VLM on a task's train split (finetuning vs probing)",
                              description="LoRA-finetune a VLM on the rows of --split (default: train) with the "
                                          "prompt extraction uses; the loss reads the answer tokens only.")
    p.add_argument("--data", help="JSON-lines manifest (rows of --split, default train, when rows name a split)")
    # --task, --data-root, --image-root, --prompt-style repeatable (several tasks: one adapter on all their rows);
    # --split, --per-class, --limit, --seed (also training) apply to each task
    add_task_arguments(p, several=True)
    add_model_arguments(p)
    p.add_argument("--answers", default=None, metavar="LABEL1,LABEL0",
                   help="target answers by label, e.g. Yes,No (default: the words the task's prompt style asks for, "
                        "tasks/answers.yaml; a row's 'target' field overrides; with several tasks: each task's own)")
    p.add_argument("--epochs", type=COUNT, default=3, help="passes over the rows (default 3)")
    p.add_argument("--lr", type=POSITIVE, default=2e-4, help="AdamW learning rate (constant; default 2e-4)")
    p.add_argument("--lora-rank", type=COUNT, default=8, help="rank r of the LoRA matrices (default 8)")
    p.add_argument("--lora-alpha", type=COUNT, default=16, help="LoRA scaling alpha (alpha / r scales the update; "
                   "default 16)")
    p.add_argument("--lora-dropout", type=Range(float, 0, 1, hi_open=True), default=0.05,
                   help="dropout on the LoRA input, in [0, 1) (default 0.05)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="Linear layers of the language model to adapt, comma-separated, or all-linear (default "
                        "q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--batch-size", type=COUNT, default=4, help="rows per step (default 4)")
    p.add_argument("--grad-accum", type=COUNT, default=1, help="batches per optimizer step (default 1)")
    p.add_argument("--out", required=True, help="output folder; re-running the same command resumes it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (ours and transformers')")
    p.set_defaults(func=run)


def _one(values: list[str] | None, flag: str) -> str | None:
    if values and len(values) > 1:
        raise LvlmlpError(f"{flag} is given {len(values)} times for one --task")
    return values[0] if values else None


def several_tasks(args: argparse.Namespace) -> tuple[list[dict], list[str], str]:
    """Rows (prompts applied) and targets of every --task, for one adapter (`finetune.multitask_examples`); each
    task's prompt style: its --prompt-style, else the one the paper evaluated it with (`finetune.paper_style`)."""
    from lvlmlp.study.finetune import multitask_examples, paper_style
    from lvlmlp.tasks import get_task

    tasks = args.task
    for values, flag in ((args.data_root, "--data-root"), (args.image_root, "--image-root"),
                         (args.prompt_style, "--prompt-style")):
        if values is not None and len(values) != len(tasks):
            raise LvlmlpError(f"{flag}: give one per --task ({len(tasks)}), in the same order; got {len(values)}")
    if args.data_root is None:
        raise LvlmlpError("--data-root is required with --task (one per --task, in the same order)")
    for given, flag in ((args.task_option, "--task-option"), (args.prompt_template, "--prompt-template"),
                        (args.answers, "--answers"), (args.data, "--data")):
        if given:
            raise LvlmlpError(f"{flag} applies to one --task only (with several, each task's own prompt and words)")
    if len(set(tasks)) != len(tasks):
        raise LvlmlpError(f"--task: {', '.join(tasks)} names a task twice")
    parts = []
    for i, name in enumerate(tasks):
        style = args.prompt_style[i] if args.prompt_style else paper_style(name)
        rows = get_task(name).rows(args.data_root[i], args.image_root[i] if args.image_root else None,
                                   args.split or "train", limit=args.limit, per_class=args.per_class,
                                   seed=0 if args.seed is None else args.seed)
        parts.append((name, style, rows))
    rows, targets = multitask_examples(parts)
    return rows, targets, " + ".join(f"{t} ({s})" for t, s, _ in parts)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.outputs import check_output
    from lvlmlp.steering.guard import parse_answers
    from lvlmlp.study.finetune import Settings, default_answers, finetune, row_targets

    check_output(args.out, "finetune", input_flags(args))  # never over --model (it would replace the checkpoint)
    if args.task and len(args.task) > 1:
        rows, targets, source = several_tasks(args)
        template = None  # each row's question carries its task's prompt
    else:
        args.task = _one(args.task, "--task")
        args.data_root = _one(args.data_root, "--data-root")
        args.image_root = _one(args.image_root, "--image-root")
        args.prompt_style = _one(args.prompt_style, "--prompt-style")
        # the train split by default (a manifest without splits is used whole)
        rows, task_template, source = rows_from_args(args, "finetune", seed_used=True, default_split="train")
        template = args.prompt_template or task_template
        # the words the task's prompt style asks for (tasks/answers.yaml); none for a --prompt-template of one's own
        answers = parse_answers(args.answers) or ({} if args.prompt_template else default_answers(args.task,
                                                                                                args.prompt_style))
        targets = row_targets(rows, answers, source)  # every row's target before the model loads
    settings = Settings(epochs=args.epochs, lr=args.lr, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        seed=0 if args.seed is None else args.seed,
                        target_modules=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    settings.check()
    if args.no_progress:
        silence_progress_bars()
    backend = backend_spec(args, template).build()
    summary = finetune(backend, rows, targets, args.out, settings, progress=not args.no_progress)
    losses = ", ".join(f"{x:.4f}" for x in summary["epoch_loss"])
    print(f"{args.out}: {len(rows)} rows, {summary['epochs_done']} epochs, mean loss per epoch {losses}")
    print(f"model -> {args.out}/model (adapter -> {args.out}/adapter, log -> {args.out}/train_log.jsonl)")
    return 0
