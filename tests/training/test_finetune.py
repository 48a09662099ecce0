"""Fine-tuning (`charlm train --init-from`) and train.freeze: the vocabulary merge, the weight
transfer, and both end to end through the real CLI on tiny texts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PARAGRAPH, run_cli, tiny_config, train_tiny_run

from charlm.cli import main
from charlm.config import config_yaml, load_config, validate_config
from charlm.data.corpus import load_corpus
from charlm.data.vocab import UNK, Vocab
from charlm.models.model import CharLM
from charlm.training.init_from import transfer_weights
from charlm.training.runtime import seed_everything

# Text B: English again, with characters text A (PARAGRAPH) never has.
NEW_TEXT = ("Zebras quietly jump over {brackets} & 42 [lazy] dogs!\n" + PARAGRAPH) * 15
NEW_CHARS = sorted(set(NEW_TEXT) - set(PARAGRAPH))


def call(capsys, *argv):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_user_error(result, fragment):
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("charlm: error: "), err
    assert fragment in lines[0], err


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny model trained on text A once per module (through the real CLI, a subprocess)."""
    run_dir, _, _, _ = train_tiny_run(tmp_path_factory.mktemp("source"))
    return run_dir


@pytest.fixture
def new_config(tmp_path):
    """Write text B and a tiny config training on it (`sections` update tiny_config); returns its path."""
    text = tmp_path / "new.txt"
    text.write_text(NEW_TEXT, encoding="utf-8")

    def write(name: str = "new.yaml", **sections):
        path = tmp_path / name
        path.write_text(config_yaml(tiny_config(text, **sections)), encoding="utf-8")
        return path

    return write


def load(path):
    return torch.load(path, weights_only=True)


def fresh_weights(config_path, vocab_size: int) -> dict:
    """The weights a run of this config starts from scratch with (the model is built right after
    seeding with train.seed, so they are reproducible here)."""
    cfg = load_config(config_path, [])
    seed_everything(cfg.train.seed)
    return CharLM(cfg.model, vocab_size, "fused").state_dict()


# --- the maths and the data, directly ---------------------------------------------------------


def test_extended_vocab_keeps_old_ids_and_appends_new_chars_sorted():
    old = Vocab.from_text("the cat\n")
    new = old.extended(Vocab.from_text("a Zebra!"))
    assert new.chars == old.chars + ["!", "Z", "b", "r"]  # old order kept, the rest by code point
    assert new.tokens()[: len(old)] == old.tokens()
    text = "Zebra the cat!\n"
    ids = new.encode(text).ids
    assert new.decode(ids) == text
    assert ids.tolist()[-1] == old.encode("\n").ids.item()  # an old character keeps its id
    assert new.encode("q").oov_chars == 1 and new.encode("q").ids.numel() == 0  # no <unk>: dropped
    assert Vocab.from_dict(new.to_dict()) == new  # travels in a checkpoint as it is
    with_unk = old.extended(Vocab(["a", "z"], specials=(UNK,)))  # a special joins the specials, ids move up
    assert with_unk.tokens() == [UNK] + old.chars + ["z"]
    assert with_unk.encode("q!").ids.tolist() == [0, 0]


def test_given_vocab_keys_the_corpus_cache(tmp_path):
    """An encoding with a given vocabulary is cached apart from the text's own one and from another's."""
    path = tmp_path / "new.txt"
    path.write_text(NEW_TEXT, encoding="utf-8")
    data = validate_config(tiny_config(path), "test").data
    own = load_corpus(data, cache=tmp_path / "cache")
    base = Vocab.from_text(PARAGRAPH)
    merged = base.extended(own.vocab)
    a = load_corpus(data, cache=tmp_path / "cache", vocab=merged)
    b = load_corpus(data, cache=tmp_path / "cache", vocab=Vocab.from_text(PARAGRAPH + "!").extended(own.vocab))
    again = load_corpus(data, cache=tmp_path / "cache", vocab=merged)
    assert len({own.fingerprint, a.fingerprint, b.fingerprint}) == 3 and again.fingerprint == a.fingerprint
    assert any("read from the cache" in n for n in again.notices)
    assert a.vocab == merged and a.vocab.chars[: len(base.chars)] == base.chars
    assert a.vocab.decode(a.train_ids) == NEW_TEXT[: a.train_ids.numel()]  # encoded with the merged ids


@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
def test_transfer_weights_moves_rows_by_token_and_initialises_new_ones(input_kind):
    cfg = validate_config(tiny_config("x.txt", model={"input": input_kind, "num_layers": 2}), "test").model
    old_vocab = Vocab(list("abcd"))
    new_vocab = old_vocab.extended(Vocab(list("bxy"), specials=(UNK,)))  # <unk> first: every old id moves up one
    torch.manual_seed(0)
    trained = {k: v.clone() for k, v in CharLM(cfg, len(old_vocab), "native").state_dict().items()}
    torch.manual_seed(1)
    model = CharLM(cfg, len(new_vocab), "native")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    added = transfer_weights(model, trained, old_vocab, new_vocab)
    assert added == [UNK, "x", "y"]
    got = model.state_dict()
    new_ids, old_ids = torch.tensor([0, 5, 6]), torch.tensor([1, 2, 3, 4])  # new: <unk>, x, y; old: a..d
    vocab_params = {
        "head.weight": 0,
        "head.bias": 0,
        ("embedding.weight" if input_kind == "embedding" else "rnn.layers.0.weight_ih"): 0
        if input_kind == "embedding"
        else 1,
    }
    for name, tensor in got.items():
        if name not in vocab_params:
            assert torch.equal(tensor, trained[name]), name
            continue
        dim = vocab_params[name]
        rows, old_rows, fresh_rows = tensor.movedim(dim, 0), trained[name].movedim(dim, 0), fresh[name].movedim(dim, 0)
        assert torch.equal(rows[old_ids], old_rows), name  # a..d: their trained rows, at their new ids
        if name == "head.bias":
            assert torch.equal(rows[new_ids], trained[name].min().expand(3)), name
        else:
            assert torch.equal(rows[new_ids], fresh_rows[new_ids]), name  # as a fresh model has them


# --- end to end through the CLI ---------------------------------------------------------------


@pytest.mark.slow
def test_finetune_end_to_end(source, new_config, tmp_path, capsys):
    """Fine-tune on text B with the embedding and head frozen: at the end the old characters' rows
    are still bit for bit the source's (at their ids), the new ones as documented, the recurrent
    weights trained; the model samples from a prompt with new characters that the source refuses."""
    config = new_config(train={"freeze": ["embedding", "head"], "max_steps": 4})
    run_dir = tmp_path / "ft"
    result = run_cli("train", "--config", str(config), "--out", str(run_dir), "--init-from", str(source))
    assert result.returncode == 0, result.stderr
    src = load(source / "best.pt")
    assert f"fine-tuning {source / 'best.pt'} (step {src['step']}" in result.stdout
    assert f"{len(NEW_CHARS)} new: {repr(NEW_CHARS[0])}" in result.stdout
    assert "frozen (train.freeze: embedding, head)" in result.stdout
    assert (
        f"warning: embedding.weight, head.weight, head.bias frozen: the {len(NEW_CHARS)} new vocabulary entries' "
        "rows there keep their initial values"
    ) in result.stdout

    last = load(run_dir / "last.pt")
    old, vocab = Vocab.from_dict(src["vocab"]), Vocab.from_dict(last["vocab"])
    assert vocab.chars == old.chars + NEW_CHARS and last["step"] == 4
    assert last["config"]["train"]["init_from"] == str(source / "best.pt")
    assert f"init_from: {source / 'best.pt'}" in (run_dir / "config.yaml").read_text()
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["init_from"] == {
        "checkpoint": str(source / "best.pt"),
        "step": src["step"],
        "best_val_loss": src["best_val_loss"],
        "new_tokens": NEW_CHARS,
    }
    assert start["frozen"] == ["embedding.weight", "head.weight", "head.bias"]

    weights, n_old = last["model"], len(old)
    fresh = fresh_weights(run_dir / "config.yaml", len(vocab))
    for name in ("embedding.weight", "head.weight"):
        assert torch.equal(weights[name][:n_old], src["model"][name]), name
    assert torch.equal(weights["embedding.weight"][n_old:], fresh["embedding.weight"][n_old:])
    assert torch.equal(weights["head.weight"][n_old:], fresh["head.weight"][n_old:])
    assert torch.equal(weights["head.bias"][:n_old], src["model"]["head.bias"])
    assert (weights["head.bias"][n_old:] == src["model"]["head.bias"].min()).all()
    assert not torch.equal(weights["rnn.layers.0.weight_hh"], src["model"]["rnn.layers.0.weight_hh"])

    prompt = "Zebras jump {"
    code, out, err = call(
        capsys, "sample", "--checkpoint", run_dir, "--prompt", prompt, "--length", "30", "--seed", "1"
    )
    assert code == 0 and out.startswith(prompt) and len(out) == len(prompt) + 30 + 1, err
    assert_user_error(call(capsys, "sample", "--checkpoint", source, "--prompt", prompt), "never saw in training")


@pytest.mark.slow
def test_resuming_a_finetuned_run_continues_it(source, new_config, tmp_path, capsys):
    """6 fine-tuning steps == 3 + resume + 3, bit for bit, with the source gone by then: a resume
    continues the run's own weights and vocabulary and never goes back to train.init_from."""
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    config = new_config(train={"max_steps": 6, "lr_schedule": "constant"})
    whole, split = tmp_path / "whole", tmp_path / "split"
    code, _, err = call(capsys, "train", "--config", config, "--out", whole, "--init-from", copy)
    assert code == 0, err
    code, _, err = call(
        capsys, "train", "--config", config, "--out", split, "--init-from", copy, "--set", "train.max_steps=3"
    )
    assert code == 0, err
    shutil.rmtree(copy)
    code, out, err = call(capsys, "train", "--resume", "--out", split, "--set", "train.max_steps=6")
    assert code == 0, err
    assert "resuming from step 3" in out and "fine-tuning" not in out
    a, b = load(whole / "last.pt"), load(split / "last.pt")
    assert a["step"] == b["step"] == 6 and a["vocab"] == b["vocab"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    events = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    first, resumed = [e for e in events if e["event"] == "start"]
    assert "init_from" in first and resumed["resumed"] is True and "init_from" not in resumed


@pytest.mark.slow
def test_freeze_from_scratch_keeps_frozen_weights_bit_identical(new_config, tmp_path, capsys):
    """Without --init-from too: frozen parameters stay at their initial values (also in the weight
    average that best.pt holds, with clipping on), the others train; the optimiser holds only those."""
    config = new_config(
        model={"num_layers": 2},
        train={"freeze": ["embedding", "rnn.0", "head.bias"], "ema_decay": 0.9, "grad_clip": 0.5},
    )
    run_dir = tmp_path / "run"
    code, out, err = call(capsys, "train", "--config", config, "--out", run_dir)
    assert code == 0, err
    last = load(run_dir / "last.pt")
    fresh = fresh_weights(config, len(Vocab.from_dict(last["vocab"])))
    frozen = {"embedding.weight", "head.bias"} | {n for n in fresh if n.startswith("rnn.layers.0.")}
    for name in fresh:
        for weights in (last["model"], last["raw_model"]):
            assert torch.equal(weights[name], fresh[name]) == (name in frozen), name
    assert len(last["optimizer"]["state"]) == len(fresh) - len(frozen)
    assert "frozen (train.freeze: embedding, rnn.0, head.bias)" in out


@pytest.mark.slow
def test_user_errors_are_one_line(source, new_config, tmp_path, capsys):
    config = new_config()
    out = ["--out", tmp_path / "run"]
    assert_user_error(
        call(capsys, "train", "--config", config, *out, "--init-from", source, "--set", "model.hidden_size=32"),
        "--init-from: the checkpoint is a 1x16 lstm (embedding 8), the config asks for a 1x32 lstm "
        "(embedding 8); set model.hidden_size=16 (or train from scratch)",
    )
    assert_user_error(
        call(
            capsys,
            "train",
            "--config",
            config,
            *out,
            "--init-from",
            source,
            "--set",
            "model.type=gru",
            "--set",
            "model.input=onehot",
            "--set",
            "model.embedding_dim=4",
        ),
        "set model.type=lstm model.input=embedding model.embedding_dim=8",
    )
    assert_user_error(
        call(capsys, "train", "--config", config, *out, "--init-from", source, "--set", "data.unit=bytes"),
        "data.unit is bytes here but chars in the checkpoint",
    )
    assert_user_error(
        call(capsys, "train", "--config", config, *out, "--init-from", tmp_path / "nowhere"),
        "--init-from: checkpoint not found",
    )
    assert_user_error(
        call(capsys, "train", "--resume", *out, "--init-from", source),
        "--init-from starts a new run from a trained model and --resume continues a run",
    )
    assert_user_error(
        call(capsys, "train", "--config", config, *out, "--set", "train.freeze=[rnn.1]"),
        "train.freeze: 'rnn.1' is no part of this model; valid names: embedding, rnn.0, head",
    )
    assert_user_error(
        call(capsys, "train", "--config", config, *out, "--overwrite", "--set", "train.freeze=[embedding, rnn, head]"),
        "freezes every parameter",
    )
    assert_user_error(
        call(capsys, "train", "--config", config, *out, "--overwrite", "--set", "train.freeze=['']"),
        "train.freeze: names must not be empty",
    )
    code, _, err = call(capsys, "train", "--config", config, *out, "--overwrite", "--set", "train.max_steps=2")
    assert code == 0, err
    assert_user_error(
        call(capsys, "train", "--resume", *out, "--set", "train.max_steps=4", "--set", "train.freeze=[head]"),
        "cannot resume: train.freeze is ['head']",
    )
    # the source inside the run dir that --overwrite would move aside
    assert_user_error(
        call(capsys, "train", "--config", config, *out, "--overwrite", "--init-from", tmp_path / "run"),
        "which --overwrite would move aside",
    )
