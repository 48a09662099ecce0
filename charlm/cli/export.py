"""`charlm export`: a trained model as a safetensors file (weights + config + vocabulary) or an ONNX
single-step model, checked in onnxruntime against charlm after it is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from charlm.cli import library as lib
from charlm.cli.common import console, err_console, load_model
from charlm.cli.options import CheckpointOption
from charlm.config import Config
from charlm.errors import UserError
from charlm.store.rundir import BEST, CONFIG, LAST

if TYPE_CHECKING:
    from charlm.data.vocab import Vocab
    from charlm.models.model import CharLM

FORMATS = {".safetensors": "safetensors", ".onnx": "onnx"}  # --out's suffix -> the format it implies


def export_model(
    checkpoint: CheckpointOption,
    out: Annotated[
        Path,
        typer.Option("--out", help="The file to write (replaced if it exists; a run's checkpoint only with --force)."),
    ],
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="safetensors or onnx (default: from --out's suffix, .safetensors or .onnx)."),
    ] = None,
    check_steps: Annotated[
        int,
        typer.Option(
            "--check-steps",
            min=0,
            help="onnx: steps to run the file in onnxruntime against charlm after writing it, "
            "at batch sizes 1 and 3 (0: no check).",
        ),
    ] = 50,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace a checkpoint file of a run folder with the export (never the checkpoint being exported).",
        ),
    ] = False,
) -> None:
    """Export a trained model as safetensors or ONNX.

    safetensors: the weights, with the config and vocabulary in its metadata (charlm sample, eval and
    info read it back). ONNX: one step (ids and state in, logits and the new state out, any batch
    size), run in onnxruntime against charlm after it is written."""
    _check_out(out)
    _check_not_a_checkpoint(out, checkpoint, force)
    chosen = _format(fmt, out)
    for module in ("safetensors.torch",) if chosen == "safetensors" else ("onnx", "onnxscript", "onnxruntime"):
        lib.require(module)  # before the checkpoint loads: a missing extra is said at once
    payload, model, vocab, cfg = load_model(checkpoint, "cpu")  # a .safetensors export too
    if chosen == "safetensors":
        lib.write_safetensors(out, model, vocab, cfg, payload)
    else:
        lib.write_onnx(out, model, vocab, cfg, payload)
    console().print(
        f"wrote {out} ({chosen}, {out.stat().st_size / 1e6:.1f} MB): {lib.lookup(cfg.model.type).title} "
        f"{cfg.model.num_layers}x{cfg.model.hidden_size}, "
        f"{lib.count_parameters(model):,} parameters, vocabulary of {len(vocab)}"
    )
    if chosen == "onnx" and check_steps > 0:
        _check_onnx(out, model, vocab, cfg, check_steps)


def _format(fmt: str | None, out: Path) -> str:
    if fmt is None:
        if out.suffix.lower() not in FORMATS:
            raise UserError(
                f"cannot tell the format from --out {out}: give --format safetensors or --format onnx "
                "(or name the file .safetensors or .onnx)"
            )
        return FORMATS[out.suffix.lower()]
    if fmt not in FORMATS.values():
        raise UserError(f"--format must be safetensors or onnx (got {fmt!r})")
    return fmt


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.onnx'}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it first")


def _check_not_a_checkpoint(out: Path, checkpoint: Path, force: bool) -> None:
    """--out never replaces the file being exported, and a run's checkpoint only with --force."""
    if not out.exists():
        return
    source = lib.resolve_checkpoint(checkpoint)
    if out.resolve() == source.resolve() or os.path.samefile(out, source):
        raise UserError(f"--out {out} is the checkpoint being exported (its source); write the export to another file")
    in_a_run = any((out.parent / name).exists() for name in (CONFIG, LAST, BEST))
    if in_a_run and (out.name in (LAST, BEST) or out.suffix == ".pt") and not force:
        raise UserError(
            f"--out {out} is a checkpoint of the run in {out.parent}; write the export to another "
            "file (e.g. model.safetensors), or add --force to replace it"
        )


def _check_onnx(out: Path, model: CharLM, vocab: Vocab, cfg: Config, steps: int) -> None:
    """Run the file against charlm; a disagreement beyond the tolerance is a bug (exit 1), not a user error."""
    parity = lib.check_onnx(out, model, vocab, cfg, steps)
    sizes = " and ".join(map(str, parity.batch_sizes))
    summary = (
        f"{parity.steps} steps from the prompt {parity.prompt!r} at batch sizes {sizes}: max |difference| "
        f"logits {parity.logits:.1e}, states {parity.state:.1e} (values up to {parity.largest:.3g})"
    )
    bound = f"{lib.ATOL:g} + {lib.RTOL:g} * |value|"
    if not parity.passed:
        err_console.print(
            f"charlm: error: onnxruntime disagrees with charlm beyond {bound} over {summary}; "
            f"{out} is kept for inspection (please report this)"
        )
        raise typer.Exit(1)
    console().print(f"checked in onnxruntime against charlm over {summary}; every entry within {bound}")
