"""The probe verbs: `train-probe` (a custom classifier on the stored embeddings) and `probes` (list, delete)."""

from __future__ import annotations

from pathlib import Path

import click

from indexer.cli.options import emit, handle_errors, json_option, require_store, settings_from, store_option
from search.answers import ProbeInfo, ProbeScores, ProbeTraining


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _scores_line(label: str, s: ProbeScores) -> str:
    return f"  {label:<34} precision {_fmt(s.precision)}  recall {_fmt(s.recall)}  ROC AUC {_fmt(s.roc_auc)}"


def print_training(t: ProbeTraining) -> None:
    counts = ", ".join(f"{k} {n}" for k, n in t.class_counts.items())
    m = t.metrics
    click.echo(f"probe {t.name!r}: {t.examples} labelled images ({counts}), {m.folds}-fold cross-validation")
    what = "class unsafe" if m.average == "unsafe" else "macro average over classes"
    click.echo(_scores_line(f"probe ({what})", m.probe))
    if m.base_model is not None:
        click.echo(_scores_line(f"base model ({m.base_model_rule})", m.base_model))
    else:
        click.echo("  (no base-model comparison: a custom label set, not unsafe/safe)")
    for k, s in m.per_class.items():
        click.echo(f"    {k:<32} precision {s.precision:.3f}  recall {s.recall:.3f}  images {s.support}")
    verb = "replaced the probe of that name" if t.replaced else "stored"
    click.echo(f"{verb} (labels up to event {t.label_watermark}, {t.label_source}); fitted in {t.fit_seconds:.2f}s")


def print_probes(items: list[ProbeInfo]) -> None:
    if not items:
        click.echo("no probes; train one with `nsfw-index train-probe --store DIR --name NAME`")
        return
    for p in items:
        since = "" if p.label_events_since is None else f", {p.label_events_since} label events since"
        applies = "" if p.applies else "  NOT APPLIED: trained on another model, train it again"
        click.echo(
            f"{p.name}: classes {', '.join(p.classes)}; {p.examples} images ({p.label_source}{since}); "
            f"ROC AUC {_fmt(p.metrics.probe.roc_auc)}; trained {p.trained_at}{applies}"
        )


@click.command("train-probe")
@store_option
@click.option("--name", required=True, help="Probe name (letters, digits, _ and -); training it again replaces it.")
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="CSV with a header: a column sha256 (or id, path) and a column class, for categories of your own. "
    "Default: the current human labels, unsafe vs safe.",
)
@click.option(
    "--c",
    "c",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Inverse regularisation strength of the logistic regression (smaller: simpler probe).",
)
@click.option(
    "--nsfw-level",
    type=click.Choice(["low", "medium", "high"]),
    default=None,
    help="The base model's score compared with (default medium).",
)
@click.option(
    "--nsfw-threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="The base model's verdict threshold for its precision and recall (default 0.5).",
)
@json_option()
@handle_errors
def train_probe(
    store: Path | None,
    name: str,
    labels_csv: str | None,
    c: float,
    nsfw_level: str | None,
    nsfw_threshold: float | None,
    as_json: bool,
) -> None:
    """Train a linear probe (logistic regression) on the stored embeddings and the labels, and store it: every answer
    then carries `probes: {NAME: {class: probability}}` (query, neighbours, show, HTTP, export; score --probe).

    Reports stratified k-fold cross-validated precision, recall and ROC AUC, beside the base model's own on the same
    images (unsafe/safe labels). No model pass: it reads the stored vectors.

    \b
    Example:
      nsfw-index train-probe --store ./store --name unsafe-v2
      nsfw-index train-probe --store ./store --name artwork --labels categories.csv --json
    """
    from search.probes import read_class_csv
    from search.probes import train_probe as train
    from search.store import Store

    settings = settings_from(store=store, nsfw_level=nsfw_level, nsfw_threshold=nsfw_threshold)
    rows = read_class_csv(labels_csv) if labels_csv else None
    source = f"csv:{Path(labels_csv).name}" if labels_csv else "labels"
    # writable, without the writer lock: one row is written, as labels are, while an index run may go on
    with Store(require_store(settings)) as handle:
        result = train(handle, name, settings, assignments=rows, label_source=source, c=c)
    if as_json:
        emit(result.to_json())
    else:
        print_training(result)


@click.command("probes")
@store_option
@click.option("--delete", "delete", default=None, metavar="NAME", help="Delete the probe NAME.")
@json_option("One JSON object per probe.")
@handle_errors
def probes(store: Path | None, delete: str | None, as_json: bool) -> None:
    """List the store's probes: classes, training set, label events since training, cross-validated ROC AUC, and
    whether each applies to the store's vectors (a probe of another model is left out of answers).

    \b
    Example:
      nsfw-index probes --store ./store
      nsfw-index probes --store ./store --delete unsafe-v1
    """
    from search.errors import NotFound
    from search.probes import probe_infos
    from search.store import Store

    settings = settings_from(store=store)
    if delete is not None:
        with Store(require_store(settings)) as handle:
            if not handle.delete_probe(delete):
                raise NotFound(f"no probe named {delete!r} in the store at {handle.root}")
        click.echo(f"deleted probe {delete!r}", err=True)
        return
    with Store(require_store(settings), readonly=True) as handle:
        items = probe_infos(handle)
    if as_json:
        for p in items:
            emit(p.to_json())
    else:
        print_probes(items)
