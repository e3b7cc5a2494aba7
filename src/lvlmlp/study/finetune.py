"""Finetuning vs probing: LoRA-finetune a VLM on a task's train split and compare it with the first-token probe.

The paper's last comparison: with the same training data, does finetuning the model (LoRA, the `peft` library)
make its own answers as good as a linear probe on the base model's first-token logits?

* `row_targets` turns rows into target answers: a row's own `target` field, else the answer its label implies
  (`answers={1: "Yes", 0: "No"}`, or the words the task's prompt style asks for, `default_answers`, read from
  tasks/answers.yaml), else the dataset's answer for label 1 rows that have one.
* `encode_examples` builds a training batch with the backend's own encoding (the prompt is exactly the one
  extraction uses) and the target's tokens appended; `labels` are -100 everywhere except on the answer tokens.
* `finetune` trains LoRA adapters with AdamW, one checkpoint per epoch (a re-run resumes after the last one),
  and writes `OUT/model` (a plain Hugging Face folder, adapter merged), `OUT/adapter` (the peft adapter) and
  `OUT/train_log.jsonl` (loss per optimizer step).
* `compare` runs the whole comparison on train/test rows: finetuned model's own answer and answer-token
  probability per epoch, the probe on the base model's and on the finetuned model's first-token logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lvlmlp.defaults import BATCH_SIZE, N_BOOT
from lvlmlp.errors import LvlmlpError
from lvlmlp.outputs import claim_folder, read_json

if TYPE_CHECKING:
    import torch

    from lvlmlp.extraction.backend import Backend

log = logging.getLogger("lvlmlp")

IGNORE = -100  # label of positions that add nothing to the loss (prompt, image, padding)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the language model's attention, in every family here

@dataclass(frozen=True)
class Settings:
    """Hyper-parameters of one finetuning. The defaults are small and common; LLaVA-1.5's own LoRA recipe (the
    paper finetuned LLaVA-1.5-7B with LoRA, 15 epochs) is rank 128, alpha 256, lr 2e-4 on every Linear layer of the
    language model, with a cosine schedule and its projector trained too: here the learning rate is constant and
    only the adapters train (`target_modules=("all-linear",), lora_rank=128, lora_alpha=256` comes closest)."""

    epochs: int = 3
    lr: float = 2e-4
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # names in the language model, or ("all-linear",)
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    max_grad_norm: float = 1.0

    def check(self) -> None:
        for name in ("epochs", "lora_rank", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LvlmlpError(f"finetune: {name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0 or not 0 <= self.lora_dropout < 1 or not math.isfinite(self.lr):
            raise LvlmlpError(f"finetune: need lr > 0 and 0 <= lora_dropout < 1 (got {self.lr}, {self.lora_dropout})")
        if not self.lora_alpha > 0 or not math.isfinite(self.lora_alpha):
            raise LvlmlpError(f"finetune: lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not self.target_modules:
            raise LvlmlpError("finetune: no LoRA target modules given")


# ------------------------------------------------------------------------------------------------------ targets
def default_answers(task: str | None, style: str | None) -> dict[int, str]:
    """The words `task`'s prompt `style` asks for, per label (`lvlmlp.tasks.answer_words`, tasks/answers.yaml):
    e.g. MM-SafetyBench `mq` {1: "No", 0: "Yes"}; `DATASET_ANSWER` for a label means each row's own answer.
    {} without a task, for a style the task lacks (a custom template) and for a style without words (then each
    row needs --answers or a `target` field); `style` None: the task's default style."""
    from lvlmlp.tasks import answer_words, prompt_styles

    if task is None or (style is not None and style not in prompt_styles(task)):
        return {}
    return answer_words(task, style)


def row_targets(rows: Sequence[dict], answers: dict[int, str] | None, source: str) -> list[str]:
    """One target answer per row (see the module docstring); a row without one is an error naming it."""
    from lvlmlp.tasks import DATASET_ANSWER

    answers = answers or {}
    if not rows:
        raise LvlmlpError(f"{source}: no rows to finetune on")
    out = []
    for row in rows:
        target = row.get("target")
        label = row.get("label")
        if target is None and label is None:
            raise LvlmlpError(f"{source}: row {row['id']!r} has no label (finetuning needs labels or a 'target')")
        if target is None and label in answers:
            target = _dataset_answer(row) if answers[label] == DATASET_ANSWER else answers[label]
        if target is None and label == 1:
            target = _dataset_answer(row)
        if not isinstance(target, str) or not target.strip():
            raise LvlmlpError(f"{source}: row {row['id']!r} (label {label}): no target answer; give --answers "
                              "LABEL1,LABEL0, a --prompt-style with answer words (mq), or a 'target' field")
        out.append(target.strip())
    return out


def paper_style(task: str) -> str:
    """The prompt style the paper's finetuned model was evaluated with for `task` (the original's
    scripts/finetune_all.sh): `mq` where the task has one (VizWiz, MM-SafetyBench, MAD), else the task's default
    (POPE, ImageNet: `oe`)."""
    from lvlmlp.tasks import get_task, prompt_styles

    return "mq" if "mq" in prompt_styles(task) else get_task(task).default_prompt_style


def multitask_examples(parts: Sequence[tuple[str, str, Sequence[dict]]]) -> tuple[list[dict], list[str]]:
    """Rows and targets of several tasks for ONE finetuning (the paper trained one LoRA adapter on its tasks'
    training data together): `parts` = (task, prompt style, rows) per task. Each row's question carries its
    task's prompt already (a backend without a template of its own then renders exactly the prompt extraction
    uses for that task), its id is prefixed `TASK:STYLE/` (unique across tasks; the style is part of what the
    checkpoint depends on), and its target comes from that task and style's answer words (`row_targets`)."""
    from lvlmlp.tasks import apply_template, prompt_template

    rows: list[dict] = []
    targets: list[str] = []
    for task, style, task_rows in parts:
        template = prompt_template(task, style)
        targets += row_targets(task_rows, default_answers(task, style), f"task {task} ({style})")
        rows += [{**r, "id": f"{task}:{style}/{r['id']}", "question": apply_template(template, r["question"]),
                  "task": task} for r in task_rows]
    return rows, targets


def _dataset_answer(row: dict) -> str | None:
    """The row's reference answer: `answer`, else the most frequent of `answers` (VizWiz's ten annotators)."""
    if isinstance(row.get("answer"), str | int | float) and str(row["answer"]).strip():
        return str(row["answer"])
    answers = [a for a in row.get("answers") or [] if isinstance(a, str) and a.strip()]
    return max(answers, key=answers.count) if answers else None


def target_ids(tokenizer: Any, text: str, eos_id: int | None, where: str) -> list[int]:
    """The target's tokens as a continuation of the prompt (as `lvlmlp generate` forces answers), then EOS so the
    model learns to stop; special or unknown tokens in the text are an error (they are not the text)."""
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    bos = getattr(tokenizer, "bos_token_id", None)
    if ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    special = set(getattr(tokenizer, "all_special_ids", ()))
    if not text.strip() or special & set(ids):
        raise LvlmlpError(f"{where}: target {text!r}: the tokenizer cannot encode it as plain text "
                          f"({'blank' if not text.strip() else 'special or unknown tokens'})")
    return ids + ([eos_id] if eos_id is not None else [])


# ------------------------------------------------------------------------------------------------------- batches
def encode_examples(backend: Backend, images: list, questions: list[str], targets: list[list[int]]
                    ) -> dict[str, torch.Tensor]:
    """The backend's prompt batch (left-padded, as in extraction) with each row's target ids appended and the
    answer block right-padded. Returns the model inputs plus `labels` (B, T): the target ids at their positions,
    IGNORE elsewhere, and `answer_len` A (the width of the answer block, the last A columns)."""
    import torch

    batch = backend.collate(images, questions)
    ids = batch["input_ids"]
    bsz, width = ids.shape[0], max(len(t) for t in targets)
    answer = torch.full((bsz, width), backend.pad_id, dtype=ids.dtype)
    mask = torch.zeros((bsz, width), dtype=ids.dtype)
    labels = torch.full((bsz, ids.shape[1] + width), IGNORE, dtype=torch.long)
    for i, t in enumerate(targets):
        answer[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
        labels[i, ids.shape[1] : ids.shape[1] + len(t)] = torch.tensor(t)
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if key == "input_ids":
            value = torch.cat([value, answer], 1)
        elif key == "attention_mask":
            value = torch.cat([value, mask.to(value.dtype)], 1)
        elif value.dim() == 2 and value.shape == ids.shape and not key.startswith("qformer"):
            # Per-token types (Qwen's mm_token_type_ids, PaliGemma's token_type_ids): answer tokens are text;
            # PaliGemma marks the suffix it must attend to causally with 1.
            fill = 1 if key == "token_type_ids" and backend.family == "paligemma" else 0
            value = torch.cat([value, torch.full((bsz, width), fill, dtype=value.dtype)], 1)
        elif value.dim() > 2 and value.shape[:2] == ids.shape:
            # A per-token mask over the images (Mllama's cross_attention_mask: batch, tokens, images, tiles): answer
            # tokens see what the last prompt token sees, as `generate` extends it token by token.
            value = torch.cat([value, value[:, -1:].expand(-1, width, *value.shape[2:])], 1)
        out[key] = value
    out["labels"] = labels
    out["answer_len"] = torch.tensor(width)
    return out


def answer_loss(backend: Backend, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens only. Only the last A+1 positions' logits are computed
    (`logits_to_keep`): the prompt's last token predicts the first answer token, and so on."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_len")}
    width = int(batch["answer_len"])
    out = backend.model(**inputs, position_ids=backend.generation_position_ids(inputs), logits_to_keep=width + 1,
                        use_cache=False, return_dict=True)
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, -width:].reshape(-1),
                           ignore_index=IGNORE)


# ------------------------------------------------------------------------------------------------------ training
def lora_targets(model: Any, names: Sequence[str]) -> str:
    """A peft `target_modules` regex for the named Linear layers of the language model only (the vision tower's
    `q_proj` etc. stay frozen, as in LLaVA's LoRA recipe); an unknown name is an error listing the known ones."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    prefix = next((n for n, m in model.named_modules() if m is decoder and n), None)
    if prefix is None:
        raise LvlmlpError(f"finetune: cannot find the language model inside {type(model).__name__}")
    linear = {n.rsplit(".", 1)[-1] for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear) and n}
    wanted = sorted(linear) if list(names) == ["all-linear"] else list(names)
    unknown = [n for n in wanted if n not in linear]
    if unknown:
        raise LvlmlpError(f"--lora-targets: unknown target module {unknown[0]!r} in the language model "
                          f"(Linear layers there: {', '.join(sorted(linear))}; or all-linear)")
    return rf"^{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, wanted))})$"


def _settings_key(settings: Settings, backend: Backend, targets: list[str], rows: Sequence[dict]) -> str:
    """What a checkpoint depends on; `epochs` is left out so a finished run can be extended with more epochs."""
    doc = {**asdict(settings), "epochs": None, "model": backend.weights_hash, "dtype": str(backend.dtype),
           "prompt": backend.prompt("{question}"), "rows": [r["id"] for r in rows], "targets": targets}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def finetune(backend: Backend, rows: Sequence[dict], targets: Sequence[str], out: str | Path,
             settings: Settings = Settings(), *, progress: bool = True,
             on_epoch: Callable[[int, Backend], None] | None = None) -> dict[str, Any]:
    """LoRA-finetune `backend.model` IN PLACE on (row, target) pairs; see the module docstring for `out`.

    `on_epoch(epoch, backend)` runs after each epoch with the adapter active (model in eval mode), e.g. to
    evaluate; epochs finished by an earlier run are not trained again (the last one is passed again, so that a
    callback that keeps its results can finish what a kill cut short). Returns the summary
    written to `out/finetune.json`."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm import tqdm

    from lvlmlp.data import load_image

    settings.check()
    out = Path(out)
    source = f"finetune {out}"
    if len(targets) != len(rows):
        raise LvlmlpError(f"{source}: {len(targets)} targets for {len(rows)} rows")
    eos = backend.tokenizer.eos_token_id
    eos = min(backend.eos_ids, default=None) if eos is None else int(eos)  # else the generation config's
    ids = [target_ids(backend.tokenizer, t, eos, f"{source}: row {r['id']!r}") for r, t in zip(rows, targets)]
    regex = lora_targets(backend.model, settings.target_modules)  # all checks before any training
    missing = [r["id"] for r in rows if not Path(r["image"]).is_file()]
    if missing:
        raise LvlmlpError(f"{source}: row {missing[0]!r}: image not found")

    key = _settings_key(settings, backend, list(targets), rows)
    claim_folder(out, "finetune")  # new, empty or a finetune folder: never the user's files
    summary_path = out / "finetune.json"
    if summary_path.is_file() and read_json(summary_path).get("key") != key:
        raise LvlmlpError(f"{out}: holds a finetuning with other settings, rows or model; use another --out")

    torch.manual_seed(settings.seed)  # LoRA's A matrices are drawn at random
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=regex, bias="none")
    with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5 (a FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(backend.model, config)  # injects the adapters into backend.model itself
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)

    done, log_rows = _resume(out, model, optimizer, set_peft_model_state_dict, load_file)
    summary = {"key": key, "model": backend.model_id, "prompt": backend.prompt("{question}"),
               "settings": asdict(settings), "n_rows": len(rows), "target_modules_regex": regex,
               "epochs_done": done, "epoch_loss": _epoch_losses(log_rows)}
    _write_json(summary_path, summary)
    if done and on_epoch is not None:  # the resumed epoch's adapter is loaded: finish an evaluation cut short
        model.eval()
        on_epoch(done, backend)
    step = log_rows[-1]["step"] if log_rows else 0
    for epoch in range(done + 1, settings.epochs + 1):
        # Each epoch's order and dropout come from (seed, epoch): a resumed run trains exactly like an unbroken one.
        order = np.random.default_rng([settings.seed, epoch]).permutation(len(rows))
        torch.manual_seed(settings.seed * 1000 + epoch)
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                # Batch norm in train mode would move its running statistics towards the training batches (FastVLM's
                # FastViT tower): frozen layers that LoRA does not train, and the merged model, must not change.
                module.eval()
        chunks = [order[s : s + settings.batch_size] for s in range(0, len(order), settings.batch_size)]
        bar = tqdm(chunks, desc=f"finetune epoch {epoch}/{settings.epochs}", unit="batch", file=sys.stderr,
                   disable=not progress)
        pending: list[float] = []
        for i, chunk in enumerate(bar):
            rows_ = [rows[j] for j in chunk]
            batch = encode_examples(backend, [load_image(r["image"], r["id"]) for r in rows_],
                                    [r["question"] for r in rows_], [ids[j] for j in chunk])
            loss = answer_loss(backend, backend.to_device(batch))
            if not torch.isfinite(loss):
                raise LvlmlpError(f"{source}: loss is {loss.item()} at epoch {epoch}; lower --lr")
            (loss / settings.grad_accum).backward()
            pending.append(loss.item())
            if len(pending) == settings.grad_accum or i == len(chunks) - 1:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                log_rows.append({"epoch": epoch, "step": step, "loss": float(np.mean(pending))})
                bar.set_postfix(loss=f"{log_rows[-1]['loss']:.4f}")
                pending = []
        bar.close()
        model.eval()
        _checkpoint(out, epoch, model, optimizer, log_rows)
        summary.update(epochs_done=epoch, epoch_loss=_epoch_losses(log_rows))
        _write_json(summary_path, summary)
        log.info("finetune: epoch %d/%d, mean loss %.4f", epoch, settings.epochs, summary["epoch_loss"][-1])
        if on_epoch is not None:
            on_epoch(epoch, backend)
    model.eval()
    _save_final(out, model, backend)
    return summary


def _epoch_losses(log_rows: list[dict]) -> list[float]:
    epochs = sorted({r["epoch"] for r in log_rows})
    return [float(np.mean([r["loss"] for r in log_rows if r["epoch"] == e])) for e in epochs]


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def _checkpoint(out: Path, epoch: int, model: Any, optimizer: Any, log_rows: list[dict]) -> None:
    """OUT/checkpoints/epoch-N: adapter, optimizer state (safetensors + JSON) and the log so far; written to a
    temporary folder and renamed, so a kill leaves either the whole checkpoint or none."""
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"epoch-{epoch:03d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().reshape(-1).clone() for i, s in state["state"].items()
               for k, v in s.items()}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    _write_json(tmp / "optimizer.json", {"param_groups": state["param_groups"]})
    (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_rows))
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    log_tmp = out / "train_log.jsonl.tmp"
    shutil.copyfile(final / "train_log.jsonl", log_tmp)
    log_tmp.replace(out / "train_log.jsonl")


def _resume(out: Path, model: Any, optimizer: Any, set_state: Any, load_file: Any) -> tuple[int, list[dict]]:
    """Load the last complete epoch checkpoint, if any: (epoch, its training log)."""
    done = sorted(p for p in (out / "checkpoints").glob("epoch-[0-9][0-9][0-9]") if p.is_dir())
    if not done:
        return 0, []
    last = done[-1]
    set_state(model, load_file(str(last / "adapter_model.safetensors")))
    flat = load_file(str(last / "optimizer.safetensors"))
    groups = json.loads((last / "optimizer.json").read_text())["param_groups"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        i, k = name.split(".", 1)
        shape = () if k == "step" else params[int(i)].shape
        state.setdefault(int(i), {})[k] = value.reshape(shape).to(params[int(i)].device)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    log_rows = [json.loads(line) for line in (last / "train_log.jsonl").read_text().splitlines() if line]
    log.info("finetune: resuming after epoch %d (%s)", int(last.name.split("-")[1]), last)
    return int(last.name.split("-")[1]), log_rows


def _save_final(out: Path, model: Any, backend: Backend) -> None:
    """OUT/adapter (peft) and OUT/model (adapter merged into a plain checkpoint with the processor)."""
    adapter = out / "adapter"
    model.save_pretrained(adapter)
    merged = model.merge_and_unload()  # backend.model now holds the merged weights, no peft layers
    backend.model = merged
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    backend.processor.save_pretrained(tmp)
    shutil.rmtree(out / "model", ignore_errors=True)
    tmp.replace(out / "model")


# ---------------------------------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class Readout:
    """How a finetuned model's output is read as a label-1 score: its own answer (`own(response, row)` -> 0/1)
    and the probability of `token` as the first generated token (1 - p when `negate`: the word speaks for 0)."""

    token: str
    negate: bool
    own: Callable[[str, dict], int]


def readout_for(answers: dict[int, str]) -> Readout:
    """The readout of answer words: label 1's word when fixed (Yes/No), else label 0's (a refusal phrase); the
    own answer is whether the response starts with it, as `lvlmlp generate --answers` reads responses."""
    from lvlmlp.steering.guard import answer_label
    from lvlmlp.tasks import DATASET_ANSWER

    answers = {label: text for label, text in answers.items() if text != DATASET_ANSWER}  # no one word to read
    if 1 in answers:
        return Readout(answers[1], False, lambda response, row: answer_label(response, answers[1]))
    if 0 in answers:
        return Readout(answers[0], True, lambda response, row: 1 - answer_label(response, answers[0]))
    raise LvlmlpError("finetune: the comparison needs answer words for label 1 or 0 (--answers / finetune.answers)")


def probe_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                 make_probe: Callable[[], Any]) -> np.ndarray:
    """P(label 1) of a fresh probe from `make_probe` (the configured probe's factory) on first-token logits."""
    if len(np.unique(y_train)) < 2:
        raise LvlmlpError("finetune comparison: the probe's train rows hold one class only")
    return make_probe().fit(x_train, y_train.astype(int)).predict_proba(x_test)[:, 1]


def first_token_logits(run: Any, rows: Sequence[dict], kind: str = "logits") -> np.ndarray:
    """(len(rows), V) first-token features of `rows` (by id) from a run: raw logits, or `kind` of them."""
    from lvlmlp.probing.features import feature_matrix

    pos = {rid: i for i, rid in enumerate(run.ids)}
    return feature_matrix(run, kind, token=0, rows=np.array([pos[r["id"]] for r in rows]))


def scored(y: np.ndarray, score: np.ndarray, n_boot: int, seed: int, threshold: float = 0.5) -> dict[str, Any]:
    """The binary metrics (accuracy and F1 at `threshold`, recorded) and AUROC interval every lvlmlp comparison
    reports."""
    from lvlmlp.probing.metrics import binary_metrics, bootstrap_ci

    return {**binary_metrics(y, score, threshold), "auroc_ci": bootstrap_ci(y, score, n_boot=n_boot, seed=seed)}


def _readout_scores(run: Any, rows: Sequence[dict], readout: Readout, tokenizer: Any) -> dict[str, np.ndarray]:
    """Own-answer and answer-token-probability scores of a run, in `rows` order."""
    from lvlmlp.probing.baselines import answer_token_ids, distribution_scores

    pos = {rid: i for i, rid in enumerate(run.ids)}
    idx = np.array([pos[r["id"]] for r in rows])
    out = {}
    if run.responses and run.responses[0] is not None:
        out["own_answer"] = np.array([readout.own(run.responses[i] or "", r) for i, r in zip(idx, rows)], float)
    p = distribution_scores(run, "token-prob", idx, token_ids=answer_token_ids(tokenizer, readout.token))
    out["answer_prob"] = 1.0 - p if readout.negate else p
    return out


def compare(model: str | Path, train_rows: Sequence[dict], test_rows: Sequence[dict], targets: Sequence[str],
            out: str | Path, settings: Settings, readout: Readout, base_probe: np.ndarray, *,
            device: str = "auto", dtype: str = "auto", prompt_template: str | None = None, raw_prompt: bool = False,
            system_prompt: str | None = None, max_new_tokens: int = 3,
            batch_size: int = BATCH_SIZE, every_epoch: bool = True, tuned_probe: bool = True, n_boot: int = N_BOOT,
            progress: bool = True, probe_threshold: float = 0.5,
            make_probe: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Finetune `model` on (train_rows, targets) into `out` and compare on `test_rows` (labels 0/1):

    * `probe (base model)`: `base_probe`, the caller's P(label 1) from the probe on the base model's logits;
    * `finetuned: own answer` / `finetuned: answer-token prob`: the merged model's greedy answer and first-token
      probability of the readout word (and, with `every_epoch`, the same per epoch with the adapter active);
    * `probe (finetuned model)` (unless not `tuned_probe`): the same probe (`make_probe`, the configured probe's
      factory; needed then) trained on the finetuned model's logits of `train_rows`.
    Every run is resumable; returns (and writes to `out/comparison.json`) the metrics with 95% intervals; the
    probes' accuracy and F1 at `probe_threshold` (the configured probe's own), the finetuned model's at 0.5."""
    from lvlmlp.extraction.extract import extract
    from lvlmlp.extraction.spec import BackendSpec

    t0 = time.perf_counter()
    out = Path(out)
    y = np.array([r.get("label") for r in test_rows], dtype=float)
    if np.isnan(y).any() or set(np.unique(y)) - {0.0, 1.0}:
        raise LvlmlpError(f"finetune comparison {out}: every test row needs a 0/1 label")
    # the prompt extraction used (the base model's probe read its logits under it)
    spec = BackendSpec(model, device=device, dtype=dtype, prompt_template=prompt_template, raw_prompt=raw_prompt,
                       system_prompt=system_prompt)
    backend = spec.build()

    def evaluate(epoch: int, tuned: Backend) -> None:
        path = out / "eval" / f"epoch-{epoch:03d}.json"
        if path.is_file():
            return
        # The run's manifest names the adapter's epoch, not the base weights it was loaded from.
        epoch_model = tuned.renamed(f"{model} + LoRA epoch {epoch}", f"{tuned.weights_hash}+{out}:{epoch}")
        run = extract(epoch_model, list(test_rows), out / "eval" / f"run-epoch-{epoch:03d}", batch_size=batch_size,
                      max_new_tokens=max_new_tokens, logits_tokens=1, store_dtype="float32",
                      progress=progress, source=f"finetune epoch {epoch}")
        scores = _readout_scores(run, test_rows, readout, tuned.tokenizer)
        _write_json(path, {"epoch": epoch, **{k: scored(y, s, n_boot, settings.seed) for k, s in scores.items()}})

    summary = finetune(backend, train_rows, targets, out / "finetune", settings, progress=progress,
                       on_epoch=evaluate if every_epoch else None)
    per_epoch = [json.loads((out / "eval" / f"epoch-{e:03d}.json").read_text())
                 for e in range(1, settings.epochs + 1) if every_epoch]
    del backend
    tuned = spec.replace(model=str(out / "finetune" / "model")).build()
    test_run = extract(tuned, list(test_rows), out / "eval" / "final-test", batch_size=batch_size,
                       max_new_tokens=max_new_tokens, logits_tokens=1, store_dtype="float32", progress=progress,
                       source="finetuned model, test rows")
    methods = {"probe (base model)": scored(y, np.asarray(base_probe, float), n_boot, settings.seed, probe_threshold)}
    for key, score in _readout_scores(test_run, test_rows, readout, tuned.tokenizer).items():
        methods[f"finetuned: {key.replace('_', ' ')}"] = scored(y, score, n_boot, settings.seed)
    if tuned_probe:
        if make_probe is None:
            raise LvlmlpError("finetune comparison: tuned_probe needs the probe's factory (make_probe)")
        probe_rows = list(train_rows)
        train_run = extract(tuned, probe_rows, out / "eval" / "final-train", batch_size=batch_size,
                            store_dtype="float32", progress=progress, source="finetuned model, train rows")
        y_train = np.array([r.get("label") for r in probe_rows], dtype=float)
        score = probe_scores(first_token_logits(train_run, probe_rows), y_train,
                             first_token_logits(test_run, test_rows), make_probe)
        methods["probe (finetuned model)"] = scored(y, score, n_boot, settings.seed, probe_threshold)
    result = {
        "n_test": len(test_rows), "n_finetune_rows": len(train_rows), "epochs": settings.epochs,
        "readout_token": readout.token, "epoch_loss": summary["epoch_loss"],
        "methods": methods, "per_epoch": per_epoch, "seconds": round(time.perf_counter() - t0, 1),
    }
    _write_json(out / "comparison.json", result)
    return result


COMPARISON_HEADER = ["method", "AUROC [95% CI]", "accuracy", "F1", "n"]


def comparison_rows(result: dict[str, Any]) -> list[list[str]]:
    """The comparison table's rows (methods x metrics), as text, in the number format of every report."""
    from lvlmlp.study.report import fmt_ci, fmt_value

    return [[name, fmt_ci(m["auroc"], m.get("auroc_ci")), fmt_value(m["accuracy"]), fmt_value(m["f1"]), str(m["n"])]
            for name, m in result["methods"].items()]


def plot_epochs(result: dict[str, Any], path: str | Path, title: str) -> None:
    """AUROC per epoch of the finetuned model's own answer and answer-token probability, with the probe's as a line."""
    from lvlmlp.study.report import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(5, 3.6))
    epochs = [e["epoch"] for e in result["per_epoch"]]
    for key, label in (("own_answer", "finetuned: own answer"), ("answer_prob", "finetuned: answer-token prob")):
        values = [e.get(key, {}).get("auroc") for e in result["per_epoch"]]
        if any(v is not None for v in values):
            ax.plot(epochs, [np.nan if v is None else v for v in values], "o-", label=label)
    for name, style in (("probe (base model)", "--"), ("probe (finetuned model)", ":")):
        value = result["methods"].get(name, {}).get("auroc")
        if value is not None:
            ax.axhline(value, linestyle=style, color="grey" if style == "--" else "black", label=name)
    ax.set(title=title, xlabel="epoch", ylabel="AUROC")
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
