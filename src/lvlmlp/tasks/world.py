"""The demo world's six task analogues (`lvlmlp.demo.world`) as registered tasks: `world-answerability` ... so that the
demo's rows, labels and per-group rules come from the task registry like every benchmark's.

The "data root" is where the generated images go (`<data-root>/images/ANALOGUE/ID.png`); the rows are a pure
function of the options, so nothing has to be downloaded.
"""

from __future__ import annotations

from lvlmlp.tasks.base import Request, Task, as_int

LAYOUT = """\
nothing to download: rows are generated (seeded) and their images written to
<image-root>/ANALOGUE-SPLIT-NNNNN.png, default <data-root>/images/ANALOGUE
splits: train, test; rows i = 0..n-1 of each split are the same whatever n is
options: n (rows per split, default 200), n_train / n_test (that split's rows, default n), world_seed (default 0)"""

# analogue -> (paper benchmark, kind, label names, per-group metrics)
ANALOGUES: dict[str, tuple[str, str, tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "answerability": ("VizWiz", "binary", ("unanswerable (degraded image)", "answerable"), ()),
    "safety": ("MM-SafetyBench", "binary", ("unsafe (harmful word in the image)", "safe (benign word)"),
               (("scenario", "attack-success-rate"),)),
    "deception": ("MAD-Bench", "binary", ("deceptive (false premise)", "normal question"), ()),
    "uncertainty": ("MathVista", "binary-from-response", ("the model's count is wrong", "the model's count is right"),
                    ()),
    "hallucination": ("POPE", "binary", ('the truthful answer is "no"', 'the truthful answer is "yes"'),
                      (("category", "pope"),)),
    "classification": ("ImageNet", "multiclass", (), ()),
}


def _loader(analogue: str):
    def load(req: Request) -> list[dict]:
        from lvlmlp.demo import world

        key = f"n_{req.split}" if f"n_{req.split}" in req.options else "n"  # this split's own count, else n
        raw = req.options.get(key, 200)
        n = as_int(raw, key, req.task)
        seed = as_int(req.options.get("world_seed", 0), "world_seed", req.task, minimum=0)
        if n is None or n < 1:
            raise req.error(f"option {key} must be a positive integer, got {raw!r}")
        images = req.image_root if req.image_root is not None else req.data_root / "images" / analogue
        return world.split_rows(analogue, req.split, images, n, seed or 0)

    return load


def _label_from_response(response: str, row: dict) -> int:
    from lvlmlp.demo import world

    return world.label_from_response(response, row)


def _answer_fn(analogue: str):
    def read(response: str, row: dict) -> int:
        from lvlmlp.demo import world

        return world.task_label_of_response(analogue, response, row)

    return read


def _task(analogue: str) -> Task:
    paper, kind, label_names, groups = ANALOGUES[analogue]
    return Task(
        name=f"world-{analogue}",
        description=f"demo world: the {analogue} analogue of {paper} (synthetic images, seeded)",
        kind=kind,
        splits=("train", "test"),
        label_names=label_names,
        layout=LAYOUT,
        default_image_root=f"images/{analogue}",
        load=_loader(analogue),
        label_fn=_label_from_response if kind == "binary-from-response" else None,
        answer_fn=None if kind == "binary-from-response" else _answer_fn(analogue),  # uncertainty: it is the label
        groups=groups,
        options=(("n", "rows per split (default 200)"), ("n_train", "train rows (default n)"),
                 ("n_test", "test rows (default n)"), ("world_seed", "the world's seed (default 0)")),
    )


TASKS: tuple[Task, ...] = tuple(_task(a) for a in ANALOGUES)
