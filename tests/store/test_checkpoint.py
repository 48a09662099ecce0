"""Checkpoints: round trip, atomic writes, and refusal of anything that is not plain data."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from charlm.config import validate_config
from charlm.data.vocab import Vocab
from charlm.models.model import CharLM
from charlm.store.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    describe_model,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)

CONFIG = {
    "data": {"path": "x.txt"},
    "model": {"hidden_size": 8, "num_layers": 1, "embedding_dim": 4},
    "train": {"max_steps": 1},
}


def payload():
    cfg = validate_config(CONFIG)
    torch.manual_seed(0)
    model = CharLM(cfg.model, 5, "native")
    return {
        "config": cfg.to_dict(),
        "vocab": Vocab(list("abcde")).to_dict(),
        "model": model.state_dict(),
        "step": 3,
        "best_val_loss": 1.5,
    }, model


def test_round_trip(tmp_path):
    data, model = payload()
    save_checkpoint(data, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path)  # a run dir resolves to its checkpoint
    assert loaded["format_version"] == FORMAT_VERSION and loaded["step"] == 3
    rebuilt, vocab = model_from_checkpoint(loaded)
    idx = torch.randint(0, 5, (2, 6))
    torch.testing.assert_close(rebuilt(idx)[0], model.eval()(idx)[0])
    assert vocab.chars == list("abcde")


def test_run_dir_prefers_best(tmp_path):
    data, _ = payload()
    save_checkpoint(data, tmp_path / "last.pt")
    assert resolve_checkpoint(tmp_path).name == "last.pt"
    save_checkpoint(data, tmp_path / "best.pt")
    assert resolve_checkpoint(tmp_path).name == "best.pt"


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    data, _ = payload()
    path = tmp_path / "last.pt"
    save_checkpoint(data, path)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint is unchanged"):
        save_checkpoint({**data, "step": 4}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


class Exploit:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_exploit(path, marker):
    data, _ = payload()
    torch.save({**data, "format": "charlm-checkpoint", "format_version": 1, "evil": Exploit(marker)}, path)


def test_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    write_exploit(tmp_path / "last.pt", marker)
    with pytest.raises(CheckpointError, match="refusing to load it"):
        load_checkpoint(tmp_path / "last.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "damaged or not a checkpoint"),
        (lambda p: p.write_bytes(os.urandom(2000)), "damaged or not a checkpoint"),
        (lambda p: p.write_bytes(b""), "damaged or not a checkpoint"),
        (lambda p: torch.save({"hello": 1}, p), "is not a charlm checkpoint"),
        (lambda p: torch.save([1, 2], p), "is not a charlm checkpoint"),
        (
            lambda p: torch.save({**payload()[0], "format": "charlm-checkpoint", "format_version": 99}, p),
            "newer than this charlm",
        ),
        (lambda p: torch.save({"format": "charlm-checkpoint", "format_version": 1}, p), "incomplete"),
    ],
)
def test_damaged_or_foreign_files(tmp_path, corrupt, message):
    path = tmp_path / "ck.pt"
    save_checkpoint(payload()[0], path)
    corrupt(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_weights_that_do_not_match_the_config(tmp_path):
    data, _ = payload()
    data["vocab"] = Vocab(list("abcdefg")).to_dict()  # 7 characters, weights for 5
    save_checkpoint(data, tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match="do not match its config and vocabulary"):
        model_from_checkpoint(load_checkpoint(tmp_path / "ck.pt"))


def test_missing(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_runs_on_its_config_backend_and_auto_is_resolved_where_it_loads(tmp_path):
    """Older checkpoints name a concrete backend (and record none beside it): they load on it. A
    config saying auto loads on the backend auto picks for the loading device and precision."""
    data, _ = payload()
    concrete = {**data, "config": {**data["config"], "model": {**data["config"]["model"], "backend": "native"}}}
    save_checkpoint(concrete, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert "backend" not in old and model_from_checkpoint(old)[0].backend == "native"
    assert describe_model(validate_config(old["config"]).model).endswith(", backend native")
    assert data["config"]["model"]["backend"] == "auto"
    assert model_from_checkpoint(data)[0].backend == "fused"  # a CPU LSTM in fp32
    assert model_from_checkpoint(data, precision="bf16")[0].backend == "native"
    assert model_from_checkpoint(concrete, backend="auto")[0].backend == "fused"  # --backend auto
    assert describe_model(validate_config(data["config"]).model, "fused").endswith(", backend auto -> fused")
