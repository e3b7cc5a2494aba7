"""The command line's commands, one small module per command (`lvlmlp COMMAND ...`).

Each module defines `register(subparsers)`, which adds its parser and sets `func` to a function of the parsed
arguments. Only these modules parse flags; no library module imports them. A command module imports nothing heavy
(torch, transformers, scikit-learn) at module level: it imports the library inside its `func`, so that
`lvlmlp --help` and commands that need no model answer at once.
"""

# Module names under lvlmlp/commands/; the order is the order of `lvlmlp --help`.
COMMANDS: list[str] = [
    "extract",
    "merge",
    "demo",
    "tasks",
    "probe",
    "report",
    "import_legacy",
    "judge",
    "generate",
    "finetune",
    "tiny_model",
    "tiny_data",
    "run",
    "transfer",
    "serve",
]
