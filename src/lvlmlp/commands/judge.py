"""`lvlmlp judge RUN --task T`: the run's responses judged by an LLM through an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "judge", help="judge a run's responses with an LLM (the original's GPT-4 templates; MathVista's extraction)",
        description="Send each response of RUN, in the original's judge template, to an OpenAI-compatible chat "
        "endpoint and append the replies to RUN/judgments.jsonl (docs/judge.md). A re-run sends only the rows "
        "not judged yet.")
    p.add_argument("run", help="a run folder extracted with --max-new-tokens (its responses are judged)")
    p.add_argument("--task", required=True, help="vizwiz, mad, mmsafety or mathvista (chooses the template)")
    p.add_argument("--prompt-style", metavar="STYLE",
                   help="the style the run was extracted with (default: the task's default); fills {question}")
    p.add_argument("--prompt-template", metavar="TEXT",
                   help="instead of --prompt-style: the template with {question} the run was extracted with")
    p.add_argument("--endpoint", required=True, metavar="URL",
                   help="the OpenAI client's base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    p.add_argument("--judge-model", metavar="NAME", help="default: the original's (gpt-4-1106-preview; "
                   "MathVista: gpt-4-0125-preview)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="the environment variable holding the API key (default OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests in flight (default 4)")
    p.add_argument("--scenario-templates", choices=("paper", "by-name"), default="paper",
                   help="MM-SafetyBench: paper = the scenario as the original's data named it (every row got the "
                   "general safety template); by-name = the five scenario templates take effect")
    p.add_argument("--mathvista-rounding", choices=("paper", "fixed"), default="paper",
                   help="MathVista float answers: paper = round(x, precision) as the original ran it on the "
                   "Hugging Face release (a float precision: scored false); fixed = MathVista's int(precision)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.errors import LvlmlpError
    from lvlmlp.extraction.store import open_run
    from lvlmlp.judging.judge import JudgeOptions, judge_run, run_prompt_template
    from lvlmlp.judging.templates import task_template

    task_template(args.task)
    opts = JudgeOptions(endpoint=args.endpoint, model=args.judge_model, api_key_env=args.api_key_env,
                        concurrency=args.concurrency, scenarios=args.scenario_templates,
                        rounding=args.mathvista_rounding, progress=not args.no_progress)
    opts.check()
    if args.prompt_template is not None and args.prompt_style is not None:
        raise LvlmlpError("give --prompt-style or --prompt-template, not both")
    template = run_prompt_template(open_run(args.run), args.task, args.prompt_style, args.prompt_template)
    summary = judge_run(args.run, args.task, template, opts)
    print(summary.line())
    return 0
