"""Linear probes on the stored embeddings: training (scikit-learn logistic regression, cross-validated against the
base model's own score) and applying them (numpy only) to vectors of the model they were trained on."""

from __future__ import annotations

import csv
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from search.answers import ClassScores, ProbeInfo, ProbeMetrics, ProbeScores, ProbeTraining
from search.errors import InvalidArgument, ModelMismatch, NotFound
from search.policy import ModelIdentity
from search.settings import Settings

if TYPE_CHECKING:  # the store imports Probe from here; at run time this module only takes an open handle
    from search.store import Store

log = logging.getLogger(__name__)

#: name -> class -> probability, as every answer carries it under `probes`.
ProbeOutputs = dict[str, dict[str, float]]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: The human label set (classes in stored order: column 1 is the positive class, `unsafe`).
UNSAFE_CLASSES: tuple[str, ...] = ("safe", "unsafe")
MAX_FOLDS = 5
MAX_CLASS_CHARS = 100
_WARNED: set[tuple[str, str]] = set()  # probes of another model, warned about once per process


@dataclass(frozen=True)
class Probe:
    """One stored probe: logistic-regression weights over the raw (L2-normalised) embedding. `coef` is (rows, dim)
    float64, one row (the logit of `classes[1]`) for two classes, one per class (softmax) for more."""

    name: str
    classes: tuple[str, ...]
    coef: np.ndarray
    intercept: np.ndarray
    model: dict[str, Any]  # ModelIdentity.stored() of the vectors it was trained on
    label_source: str = "labels"
    label_watermark: int = 0
    examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    trained_at: str = ""

    @property
    def dim(self) -> int:
        return int(self.coef.shape[1])

    def differences(self, identity: ModelIdentity | Mapping[str, Any]) -> list[str]:
        """How the model of `identity` differs from the one this probe was trained on (empty: the same)."""
        return ModelIdentity.from_stored(self.model).differences(identity)

    def require_model(self, identity: ModelIdentity | Mapping[str, Any], where: str) -> None:
        """ModelMismatch, naming each difference, when `identity` (of the vectors to score) is another model."""
        diffs = self.differences(identity)
        if diffs:
            raise ModelMismatch(
                f"probe {self.name!r} was trained on vectors of another model than {where} (probe vs vectors: "
                + "; ".join(diffs)
                + "): its outputs would mean nothing. Train it again on a store of this model: "
                f"`nsfw-index train-probe --store DIR --name {self.name}`"
            )

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        """(n, len(classes)) probabilities for (n, dim) vectors: a matmul and a sigmoid or softmax."""
        x = np.asarray(vectors)
        x = (x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)).reshape(-1, self.dim)
        # in the vectors' own precision (float32 as stored: no float64 copy of a whole store), then float64
        z = (x @ self.coef.T.astype(x.dtype)).astype(np.float64) + self.intercept
        if len(self.classes) == 2:
            p1 = 1.0 / (1.0 + np.exp(-np.clip(z[:, 0], -500, 500)))
            return np.stack([1.0 - p1, p1], axis=1)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        out: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return out


# -- applying ------------------------------------------------------------------------------------------------------
def probe_outputs(probes: Sequence[Probe], vectors: np.ndarray) -> list[ProbeOutputs]:
    """One `{name: {class: probability}}` per row of `vectors` (the caller checked the models)."""
    out: list[ProbeOutputs] = [{} for _ in range(len(vectors))]
    for p in probes:
        probs = p.predict(vectors)
        for row, values in zip(out, probs.tolist(), strict=True):
            row[p.name] = dict(zip(p.classes, values, strict=True))
    return out


def active_probes(store: Store) -> list[Probe]:
    """The store's probes that apply to its vectors (trained on its model). A probe of another model (the store
    was re-embedded since) is left out of answers, with a warning: `nsfw-index probes` shows it as not applying."""
    ident = store.model_identity()
    if ident is None:
        return []
    out = []
    for p in store.probes():
        if p.differences(ident):
            if (p.name, p.trained_at) not in _WARNED:
                _WARNED.add((p.name, p.trained_at))
                log.warning("probe %r was trained on another model than the store's: left out; train it again", p.name)
        else:
            out.append(p)
    return out


def probes_for_vector(store: Store, vector: np.ndarray) -> ProbeOutputs:
    """Every applicable probe's output for one vector of the store's model (a query or a stored embedding)."""
    probes = active_probes(store)
    return probe_outputs(probes, np.asarray(vector).reshape(1, -1))[0] if probes else {}


def probes_for_ids(store: Store, ids: Sequence[int]) -> dict[int, ProbeOutputs]:
    """Every given id -> its probe outputs from its stored vector ({} when the store has no probes)."""
    probes = active_probes(store)
    if not probes or not ids:
        return {int(i): {} for i in ids}
    return dict(zip([int(i) for i in ids], probe_outputs(probes, store.vectors(ids)), strict=True))


def load_probes(store: Store, names: Sequence[str], *, check_model: bool = True) -> list[Probe]:
    """The named probes (NotFound lists the store's). `check_model`: ModelMismatch when one was trained on vectors
    of another model than the store's now (to apply them to other vectors, `Probe.require_model` those)."""
    have = {p.name: p for p in store.probes()}
    missing = [n for n in names if n not in have]
    if missing:
        raise NotFound(
            f"no probe named {', '.join(map(repr, missing))} in the store at {store.root} (it has: "
            f"{', '.join(sorted(have)) or 'none'}); train one with `nsfw-index train-probe --store DIR --name NAME`"
        )
    chosen = [have[n] for n in dict.fromkeys(names)]
    ident = store.model_identity()
    if check_model and ident is not None:
        for p in chosen:
            p.require_model(ident, f"the store at {store.root}")
    return chosen


def score_store(store: Store, probes: Sequence[Probe]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(ids, {name: (n, classes) probabilities}) for the whole store, chunk by chunk from the stored vectors (no
    model pass). The probes must be of the store's model (`load_probes` or `active_probes`)."""
    if not probes or not store.count_images():
        return
    for ids, vecs in store.iter_vectors():
        yield ids, {p.name: p.predict(vecs) for p in probes}


def probe_infos(store: Store) -> list[ProbeInfo]:
    """`nsfw-index probes`: every stored probe, whether it applies to the store's vectors, and how many label events
    came after the ones it was trained on."""
    ident = store.model_identity()
    last = store.last_label_event()
    return [info_of(p, ident, last) for p in store.probes()]


def info_of(p: Probe, store_model: ModelIdentity | None, last_event: int) -> ProbeInfo:
    return ProbeInfo(
        name=p.name,
        classes=list(p.classes),
        examples=p.examples,
        class_counts=dict(p.params.get("class_counts", {})),
        label_source=p.label_source,
        label_watermark=p.label_watermark,
        label_events_since=max(0, last_event - p.label_watermark) if p.label_source == "labels" else None,
        trained_at=p.trained_at,
        model={k: p.model.get(k) for k in ("architecture", "weights_sha256")},
        applies=store_model is not None and not p.differences(store_model),
        metrics=ProbeMetrics.model_validate(p.metrics),
    )


# -- the label sets ------------------------------------------------------------------------------------------------
#: One row of a class CSV: (line number, the image column's name, the image reference, the class).
ClassRow = tuple[int, str, str, str]


def read_class_csv(path: str | os.PathLike[str]) -> list[ClassRow]:
    """The rows of a CSV with a header: a column `sha256`, `id`, `path` or `image` (any of them), and a column
    `class` (or `label`)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
            column = next((c for c in ("sha256", "id", "path", "image") if c in fields), None)
            key = fields[column] if column else None
            cls = next((fields[c] for c in ("class", "label") if c in fields), None)
            if column is None or key is None or cls is None:
                raise InvalidArgument(
                    f"{path}: the CSV needs a header with a column sha256 (or id, image, path) and a column class; "
                    f"it has {sorted(fields)}"
                )
            out: list[ClassRow] = []
            for row in reader:
                ref, name = (row.get(key) or "").strip(), (row.get(cls) or "").strip()
                if ref or name:
                    out.append((reader.line_num, column, ref, name))
            return out
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InvalidArgument(f"cannot read the class CSV {path}: {e}") from e


def _resolve(store: Store, column: str, ref: str) -> int | None:
    """The image a CSV cell names, read as its column says (`image`: an id, sha256 or path)."""
    if column == "sha256":
        return store.ids_by_sha([ref.lower()]).get(ref.lower())
    if column == "id":
        return int(ref) if ref.isdigit() and store.images([int(ref)]) else None
    try:
        return store.resolve_image(ref)
    except NotFound:
        return None


def _resolve_assignments(store: Store, rows: Sequence[ClassRow]) -> dict[int, str]:
    """image id -> class for CSV rows; every bad row is named (all or nothing)."""
    problems: list[str] = []
    out: dict[int, str] = {}
    for line, column, ref, name in rows:
        if not ref or not name:
            problems.append(f"line {line}: needs both an image and a class")
            continue
        if len(name) > MAX_CLASS_CHARS or any(ch == "," or ord(ch) < 32 for ch in name):
            problems.append(f"line {line}: class {name!r}: at most {MAX_CLASS_CHARS} characters, no comma")
            continue
        image_id = _resolve(store, column, ref)
        if image_id is None:
            problems.append(f"line {line}: {column} {ref!r} is not an indexed image")
            continue
        if out.get(image_id, name) != name:
            problems.append(f"line {line}: image {image_id} is already class {out[image_id]!r}, not {name!r}")
        out[image_id] = name
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise InvalidArgument("the class CSV has problems, nothing trained: " + "; ".join(problems[:10]) + more)
    return out


# -- training ------------------------------------------------------------------------------------------------------
def train_probe(
    store: Store,
    name: str,
    settings: Settings,
    *,
    assignments: Sequence[ClassRow] | None = None,
    label_source: str = "labels",
    c: float = 1.0,
    seed: int = 0,
) -> ProbeTraining:
    """Fit a probe named `name` on the stored vectors of labelled images and store it (replacing one of that name).

    Labels: the current human labels (unsafe vs safe), or `assignments`, the rows of a class CSV
    (`read_class_csv`). Stratified k-fold cross-validation (k = min(5, the smallest class)) measures it, and for the
    unsafe/safe set the base model's own verdict and score on the same images; then it is fitted on all of them."""
    if not NAME_RE.match(name):
        raise InvalidArgument(f"probe name {name!r}: 1-64 letters, digits, '_' or '-', starting with a letter or digit")
    if not c > 0:
        raise InvalidArgument(f"--c {c}: the inverse regularisation strength must be > 0")
    ident = store.model_identity()
    if ident is None:
        raise InvalidArgument(f"the store at {store.root} has no images yet; index and label some first")
    if assignments is None:
        labelled, watermark = store.probe_label_snapshot()
        hint = "label more images: `nsfw-index label --store DIR --unsafe ID ...` / `--safe ID ...`"
    else:
        labelled, watermark = _resolve_assignments(store, assignments), store.last_label_event()
        hint = "add rows to the class CSV"
    ids = sorted(labelled)
    classes = tuple(sorted(set(labelled.values())))
    counts = {k: sum(1 for i in ids if labelled[i] == k) for k in classes}
    if len(classes) < 2:
        raise InvalidArgument(f"a probe needs at least 2 classes; the labels hold {counts or 'none'}: {hint}")
    if min(counts.values()) < 2:
        raise InvalidArgument(f"every class needs at least 2 labelled images for cross-validation ({counts}): {hint}")
    t0 = time.perf_counter()
    x = store.vectors(ids).astype(np.float64)
    y = np.array([classes.index(labelled[i]) for i in ids])
    folds = min(MAX_FOLDS, min(counts.values()))
    oof = _cross_validated(x, y, folds, c, seed)
    unsafe_set = classes == UNSAFE_CLASSES
    base = None
    if unsafe_set:
        rows = store.images(ids)
        base_score = np.array([rows[i].scores[settings.nsfw_level] for i in ids])
        base = _scores(y, (base_score >= settings.nsfw_threshold).astype(int), base_score)
    metrics = ProbeMetrics(
        folds=folds,
        average="unsafe" if unsafe_set else "macro",
        probe=_scores(y, oof.argmax(1), oof[:, 1]) if unsafe_set else _macro(y, oof),
        base_model=base,
        base_model_rule=f"scores.{settings.nsfw_level} >= {settings.nsfw_threshold}" if unsafe_set else None,
        per_class=_per_class(y, oof.argmax(1), classes),
    )
    coef, intercept = _fit(x, y, c, seed)
    replaced = name in {p.name for p in store.probes()}
    probe = Probe(
        name=name,
        classes=classes,
        coef=coef,
        intercept=intercept,
        model=ident.stored(),
        label_source=label_source,
        label_watermark=watermark,
        examples=len(ids),
        metrics=metrics.to_json(),
        params={"c": c, "seed": seed, "class_weight": "balanced", "class_counts": counts},
    )
    trained_at = store.save_probe(probe)
    info = info_of(replace(probe, trained_at=trained_at), ident, store.last_label_event())
    return ProbeTraining(**dict(info), replaced=replaced, fit_seconds=round(time.perf_counter() - t0, 3))


def _model(c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # standardised features: unit-norm 768-d embeddings have per-dimension spreads near 0.04, on which C=1 would
    # regularise far harder than it says. Balanced class weights: a review sample's class ratio is the reviewers'.
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    )


def _cross_validated(x: np.ndarray, y: np.ndarray, folds: int, c: float, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    out: np.ndarray = cross_val_predict(_model(c, seed), x, y, cv=cv, method="predict_proba")
    return out


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit on everything; the scaler is folded into the weights so that applying is one matmul on raw vectors."""
    pipe = _model(c, seed).fit(x, y)
    scaler, lr = pipe[0], pipe[-1]
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    coef = np.asarray(lr.coef_, np.float64) / scale
    intercept = np.asarray(lr.intercept_, np.float64) - coef @ scaler.mean_
    return np.ascontiguousarray(coef), np.ascontiguousarray(intercept)


def _auc(y: np.ndarray, score: np.ndarray, **kw: Any) -> float | None:
    from sklearn.metrics import roc_auc_score

    try:
        return float(roc_auc_score(y, score, **kw))
    except ValueError:  # a class absent from the evaluated images
        return None


def _scores(y: np.ndarray, predicted: np.ndarray, score: np.ndarray) -> ProbeScores:
    """Precision and recall of class 1 (`unsafe`), ROC AUC of the score."""
    from sklearn.metrics import precision_score, recall_score

    return ProbeScores(
        precision=float(precision_score(y, predicted, zero_division=0)),
        recall=float(recall_score(y, predicted, zero_division=0)),
        roc_auc=_auc(y, score),
    )


def _macro(y: np.ndarray, proba: np.ndarray) -> ProbeScores:
    from sklearn.metrics import precision_score, recall_score

    predicted = proba.argmax(1)
    labels = list(range(proba.shape[1]))
    auc = _auc(y, proba[:, 1]) if proba.shape[1] == 2 else _auc(y, proba, multi_class="ovr", labels=labels)
    return ProbeScores(
        precision=float(precision_score(y, predicted, labels=labels, average="macro", zero_division=0)),
        recall=float(recall_score(y, predicted, labels=labels, average="macro", zero_division=0)),
        roc_auc=auc,
    )


def _per_class(y: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> dict[str, ClassScores]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, _, s = precision_recall_fscore_support(y, predicted, labels=list(range(len(classes))), zero_division=0)
    return {k: ClassScores(precision=float(p[j]), recall=float(r[j]), support=int(s[j])) for j, k in enumerate(classes)}
