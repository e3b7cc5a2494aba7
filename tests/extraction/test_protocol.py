"""The backend protocol: `lvlmlp extract --backend file.py:Class` runs a model outside transformers' Auto classes
(examples/minigpt4_backend.py: a vision encoder, a linear projector and a causal LM, registered nowhere), each row
of a left-padded batch as if alone, into a run folder that probes train on; bad specs are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.data import load_image, read_manifest
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.protocol import REQUIRED, BackendProtocol, load_backend
from lvlmlp.testing import tiny_manifest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "minigpt4_backend.py"
SPEC = f"{EXAMPLE}:MiniGPT4Backend"


@pytest.fixture(scope="module")
def example(minigpt4):
    """(the example module, a tiny checkpoint folder of it): conftest's `minigpt4`, shared with the e2e tests."""
    module, ckpt, _ = minigpt4
    return module, ckpt


def test_extract_runs_the_example_backend_row_by_row_exactly(example, tmp_path) -> None:
    module, ckpt = example
    manifest = tiny_manifest(tmp_path / "data", n_train=8, n_test=4)
    rows = read_manifest(manifest)
    out = tmp_path / "run"
    argv = ["extract", "--backend", SPEC, "--model", str(ckpt), "--data", str(manifest), "--out", str(out),
            "--batch-size", "5", "--max-new-tokens", "3", "--hidden", "--store-dtype", "float32", "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    run = open_run(out)
    assert run.manifest["family"] == "minigpt4-example" and run.manifest["model"] == str(ckpt)
    assert run.manifest["backend"] == SPEC  # the class that made the run, as --backend named it
    assert run.manifest["prompt_template"] == "###Human: <Img><ImageHere></Img> {question} ###Assistant:"
    # Each row alone (a batch of one, no padding) through the example's own model gives what the batch stored.
    alone = module.MiniGPT4Backend(str(ckpt), device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(alone, BackendProtocol)
    questions = {r["id"]: r["question"] for r in rows}
    for i, row in enumerate(rows):
        single = alone.encode([load_image(row["image"], row["id"])], [questions[row["id"]]])
        gen = alone.generate(single, max_new_tokens=3)
        n = int(gen["n_tokens"][0])
        assert int(run.n_tokens[i]) == n and run.responses[i] == gen["responses"][0]
        for t in range(n):
            assert np.abs(run.logits(t)[i] - gen["logits"][0, t].numpy()).max() < 1e-4, (row["id"], t)
        hidden = alone.prefill(single, hidden=True)["hidden"][0].numpy()
        assert np.abs(np.array(run.hidden()[i]) - hidden).max() < 1e-4
    # The same command again: the finished run is recognised (nothing redone, same rows).
    assert main(argv) == 0 and open_run(out).ids == run.ids
    # A probe trains on the run folder as on any other.
    assert main(["probe", "train", "--run", str(out), "--split", "train", "--out", str(tmp_path / "probe")]) == 0
    assert (tmp_path / "probe").is_dir()


def test_probe_guided_generation_through_the_example_backend(example, tmp_path) -> None:
    """`generate --backend`: the guard scores the example model's raw first-token logits (as `extract` stored them),
    flagged rows start with the template, the others are the unguarded answers."""
    import json

    from lvlmlp.probing.probes import load_probe

    _, ckpt = example
    manifest = tiny_manifest(tmp_path / "data", n_train=12, n_test=4)
    run_dir, probe_dir, out = tmp_path / "run", tmp_path / "probe", tmp_path / "out.jsonl"
    common = ["--backend", SPEC, "--model", str(ckpt), "--data", str(manifest), "--device", "cpu", "--no-progress"]
    assert main(["extract", *common, "--out", str(run_dir), "--store-dtype", "float32"]) == 0
    assert main(["probe", "train", "--run", str(run_dir), "--C", "100", "--out", str(probe_dir)]) == 0
    expected = load_probe(probe_dir).predict_proba(open_run(run_dir).logits(0))[:, 1]
    template = "the answer is"
    threshold = float(np.median(expected))  # about half the rows flagged
    assert main(["generate", *common, "--probe", str(probe_dir), "--template", template, "--threshold",
                 str(threshold), "--max-new-tokens", "6", "--eval", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    np.testing.assert_allclose([x["probe_score"] for x in lines], expected, atol=1e-5)
    flagged = [x["flagged"] for x in lines]
    assert flagged == [bool(p < threshold) for p in expected] and 0 < sum(flagged) < len(flagged)  # P(1) < t
    for x in lines:
        assert x["response"].startswith(template) == x["flagged"], x
        if not x["flagged"]:
            assert x["response"] == x["response_unguarded"]


def test_bad_backend_specs_are_one_line_errors(example, tmp_path, capsys) -> None:
    _, ckpt = example
    with pytest.raises(LvlmlpError, match=r"^--backend: expected module:Class or path/file.py:Class, got 'nocolon'$"):
        load_backend("nocolon", str(ckpt), device="cpu", dtype="float32")
    with pytest.raises(LvlmlpError, match=r"^--backend no_such_module_xyz:C: cannot import no_such_module_xyz"):
        load_backend("no_such_module_xyz:C", str(ckpt), device="cpu", dtype="float32")
    with pytest.raises(LvlmlpError, match=r"has no Nope$"):
        load_backend(f"{EXAMPLE}:Nope", str(ckpt), device="cpu", dtype="float32")
    # A class without the protocol's attributes is named with what it lacks.
    partial = tmp_path / "partial.py"
    partial.write_text("class Half:\n    def __init__(self, model, device, dtype):\n        self.model_id = model\n")
    with pytest.raises(LvlmlpError) as err:
        load_backend(f"{partial}:Half", str(ckpt), device="cpu", dtype="float32")
    missing = ", ".join(a for a in REQUIRED if a != "model_id")
    assert str(err.value) == f"--backend {partial}:Half: Half lacks {missing} (the protocol: docs/backends.md)"
    manifest = tiny_manifest(tmp_path / "data", n_train=2, n_test=0)
    capsys.readouterr()
    code = main(["extract", "--backend", SPEC, "--model", str(ckpt), "--data", str(manifest), "--out",
                 str(tmp_path / "run"), "--raw-prompt", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("lvlmlp: error: --backend: the backend renders its own prompts and "
                                               "loads its own model, so it takes no --raw-prompt")
    code = main(["extract", "--backend", SPEC, "--model", str(ckpt), "--data", str(manifest), "--out",
                 str(tmp_path / "run"), "--vision", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("lvlmlp: error: --backend: the backend renders its own prompts and "
                                               "loads its own model, so it takes no --vision")
    assert not (tmp_path / "run").exists()


def test_the_backend_spec_builds_protocol_backends(example) -> None:
    """`BackendSpec(model, backend=...)`: the one factory builds the class through `load_backend`, as what lvlmlp's
    stages use (a device batch, pad and end-of-sequence ids derived from the protocol), and refuses the fields that
    do not apply with it."""
    from lvlmlp.extraction.protocol import ProtocolBackend
    from lvlmlp.extraction.spec import BackendSpec

    _, ckpt = example
    built = BackendSpec(ckpt, device="cpu", dtype="float32", backend=SPEC).build()
    # (load_backend imports the file afresh: the class is the example's, not the very object the fixture imported)
    assert isinstance(built, ProtocolBackend) and type(built.inner).__name__ == "MiniGPT4Backend"
    assert built.protocol_spec == SPEC and isinstance(built, BackendProtocol)
    assert built.with_prompt_template(None) is built
    tok = built.inner.tokenizer
    assert built.pad_id == tok.convert_tokens_to_ids("<pad>") and built.eos_ids == {tok.convert_tokens_to_ids("</s>")}
    rows = read_manifest(tiny_manifest(Path(ckpt).parent / "spec-data", n_train=2, n_test=0))
    images, questions = [load_image(r["image"], r["id"]) for r in rows], [r["question"] for r in rows]
    batch, collated = built.encode(images, questions), built.inner.collate(images, questions)
    assert batch.keys() == collated.keys() and all(torch.equal(batch[k], collated[k]) for k in batch)
    with pytest.raises(LvlmlpError) as err:
        BackendSpec(ckpt, backend=SPEC, raw_prompt=True, prompt_template="{question}?")
    assert str(err.value) == (f"--backend {SPEC}: the backend renders its own prompts and loads its own model, "
                              "so it takes no prompt_template, raw_prompt")
    with pytest.raises(LvlmlpError, match=r"^--backend .*: the backend renders its own prompts; a prompt template "):
        built.with_prompt_template("{question} Briefly.")
    with pytest.raises(LvlmlpError, match=r"^--vision: --backend .* gives no vision features"):
        built.check_vision()
