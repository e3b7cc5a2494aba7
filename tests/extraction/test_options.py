"""The typed seams between stages: `ExtractOptions` (one definition and check of the extraction options, said by
the caller's names) and `BackendSpec` (one backend factory; identities derived, never changed in place)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.options import ExtractOptions, flag_names
from lvlmlp.extraction.spec import BackendSpec


def test_extract_options_normalise_and_derive_the_stored_token_count():
    opts = ExtractOptions(layers=[np.int64(3), -1], shard=(np.int64(1), 4), max_new_tokens=5, logits_tokens=2)
    assert opts.layers == (3, -1) and type(opts.layers[0]) is int and opts.shard == (1, 4)
    assert [ExtractOptions(max_new_tokens=5, logits_tokens=k).n_keep for k in (1, 2, 5, 9)] == [1, 2, 5, 5]
    assert ExtractOptions().n_keep == 1 and ExtractOptions(layers="quartiles").layers == "quartiles"
    assert ExtractOptions.of(opts, batch_size=2) == dataclasses.replace(opts, batch_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.batch_size = 3  # type: ignore[misc]
    # every field has its flag, and each flag is one of `lvlmlp extract`'s
    from lvlmlp.cli import build_parser

    extract_flags = {a for action in build_parser()._subparsers._group_actions[0].choices["extract"]._actions
                     for a in action.option_strings}
    assert set(flag_names().values()) <= extract_flags


def test_extract_options_refusals_name_the_field_or_the_callers_name():
    with pytest.raises(LvlmlpError) as err:
        ExtractOptions(shard_size=0)
    assert str(err.value) == "shard_size must be >= 1 and workers >= 0"
    assert err.value.named(flag_names()) == "--shard-size must be >= 1 and --workers >= 0"
    with pytest.raises(LvlmlpError, match=r"^logits_tokens: expected an integer >= 1, got 0$"):
        ExtractOptions(logits_tokens=0)


def test_lvlmlp_run_says_a_bad_extraction_option_by_its_config_key():
    from lvlmlp.study.config import ExperimentConfig, ExtractConfig
    from lvlmlp.study.experiment import extract_options

    # built directly, so that the config's own range checks (which refuse these first) are bypassed
    with pytest.raises(LvlmlpError, match=r"^batch_size must be >= 1 and extract\.max_new_tokens >= 0$"):
        extract_options(ExperimentConfig(batch_size=0))
    with pytest.raises(LvlmlpError, match=r"^extract\.store_dtype: expected one of \['float16', 'float32'\], got 'int8'$"):
        extract_options(ExperimentConfig(extract=ExtractConfig(store_dtype="int8")))  # type: ignore[arg-type]
    opts = extract_options(ExperimentConfig(batch_size=3, extract=ExtractConfig(max_new_tokens=2, layers=[1, -1])))
    assert opts == ExtractOptions(batch_size=3, max_new_tokens=2, layers=(1, -1))


def test_backend_spec_builds_the_backend_and_derived_identities_leave_it_unchanged(tiny_ckpt):
    ckpt = tiny_ckpt("llava")
    with pytest.raises(LvlmlpError, match=r"^--prompt-template: 'Q' has no \{question\} placeholder$"):
        BackendSpec(ckpt, prompt_template="Q")
    spec = BackendSpec(ckpt, device="cpu", dtype="float32", prompt_template="Q: {question}")
    assert spec.model == str(ckpt) and spec.loads_as(spec.replace(prompt_template=None))
    assert not spec.loads_as(spec.replace(dtype="float16"))
    backend = spec.build()
    assert (backend.model_id, backend.prompt_template, str(backend.dtype)) == (str(ckpt), "Q: {question}",
                                                                                "torch.float32")
    other = backend.with_prompt_template("A: {question}")
    assert other.model is backend.model and backend.prompt_template == "Q: {question}"
    assert other.prompt("x") == spec.replace(prompt_template="A: {question}").build(load_model=False).prompt("x")
    renamed = backend.renamed("m + LoRA epoch 1", "h+1")
    assert (renamed.model_id, renamed.weights_hash) == ("m + LoRA epoch 1", "h+1")
    assert (backend.model_id, backend.weights_hash) == (str(ckpt), spec.build(load_model=False).weights_hash)
    with pytest.raises(LvlmlpError, match=r"has no \{question\} placeholder"):
        backend.with_prompt_template("nothing")


def test_a_configs_extract_section_names_extract_options_and_defaults_to_theirs():
    """`extract:` keys are `ExtractOptions` fields by name (passed on as they are), and a config that sets none of
    them (nor `batch_size`) extracts with the defaults of `ExtractOptions`, defined there only."""
    from lvlmlp.study.config import ExperimentConfig, ExtractConfig
    from lvlmlp.study.experiment import extract_options

    assert {f.name for f in dataclasses.fields(ExtractConfig)} <= {f.name for f in dataclasses.fields(ExtractOptions)}
    assert extract_options(ExperimentConfig()) == ExtractOptions()
