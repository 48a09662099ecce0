"""The command table: every `charlm` command by name, in the order `charlm --help` lists them, and the
Typer app built from it. A command is a plain function in its module; its options are its parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import typer

from charlm.cli import doctor, export, files, probe, sample, serve, train, tune, use


@dataclass(frozen=True)
class Group:
    """A command with subcommands (`charlm probe gradients`)."""

    help: str
    commands: dict[str, Callable[..., None]]


# Typer lists the groups after the single commands, whatever their place here: keep them at the end.
COMMANDS: dict[str, Callable[..., None] | Group] = {
    "train": train.train,
    "sample": sample.sample,
    "eval": use.evaluate,
    "info": use.info,
    "download": files.download_corpus,
    "plot": files.plot,
    "runs": files.runs,
    "viz": files.viz,
    "serve": serve.serve,
    "export": export.export_model,
    "tune": tune.tune,
    "doctor": doctor.doctor,
    "probe": Group(
        "Measure what trained models do with time (PNG + JSON).",
        {"gradients": probe.gradients, "context": probe.context},
    ),
}


def build_app() -> typer.Typer:
    """The `charlm` Typer app with every command of COMMANDS registered under its name."""
    app = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        help="Train, sample and evaluate character-level RNN/LSTM language models.",
    )
    for name, command in COMMANDS.items():
        if isinstance(command, Group):
            group = typer.Typer(no_args_is_help=True, help=command.help)
            for sub_name, sub_command in command.commands.items():
                group.command(name=sub_name)(sub_command)
            app.add_typer(group, name=name)
        else:
            app.command(name=name)(command)
    return app
