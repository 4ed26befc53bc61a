"""``manage.py train --search N``: Optuna trials over the optimiser's settings, then the run.

Each trial is a whole training run on the same split, unregistered, in ``OUTPUT/trials/NNN``,
scored by its best epoch's validation ROC-AUC (the test part is never looked at). The winning
settings then train the run that is registered. Needs the ``training`` extra (optuna).
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.datasets import LabelledSet
from training.run import RunOptions, TrainingError, train

SEARCHED = ("lr", "weight_decay", "batch_size")


def search(dataset: LabelledSet, options: RunOptions, trials: int) -> RunOptions:
    """The options of the best of ``trials`` runs; ``search.csv`` lists them all."""
    try:
        import optuna
    except ImportError as error:
        raise TrainingError("--search needs optuna: pip install 'pacs-ai[training]'") from error

    folder = options.output / "trials"
    folder.mkdir(parents=True, exist_ok=True)
    # Every trial, and the final run, on the split the first trial draws (or the one given).
    split_file = options.split_file or folder / "000" / "split.csv"
    rows: list[dict[str, Any]] = []

    def objective(trial: Any) -> float:
        fit = replace(
            options.fit,
            lr=trial.suggest_float("lr", 1e-4, 3e-3, log=True),
            weight_decay=trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True),
            batch_size=trial.suggest_categorical("batch_size", [16, 32, 64]),
        )
        run = train(
            dataset,
            replace(
                options,
                fit=fit,
                output=folder / f"{trial.number:03d}",
                version=f"{options.version}-trial{trial.number:03d}",
                split_file=options.split_file if trial.number == 0 else split_file,
                register=False,
            ),
        )
        score = float(run.metrics["val"]["roc_auc"] or 0.0)
        rows.append({"trial": trial.number, **trial.params, "val_roc_auc": score})
        return score

    sampler = optuna.samplers.TPESampler(seed=options.seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=trials)
    _write(rows, options.output / "search.csv")
    best = study.best_params
    return replace(
        options,
        split_file=split_file,
        fit=replace(
            options.fit,
            lr=best["lr"],
            weight_decay=best["weight_decay"],
            batch_size=best["batch_size"],
        ),
    )


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["trial", *SEARCHED, "val_roc_auc"])
        writer.writeheader()
        writer.writerows(rows)
