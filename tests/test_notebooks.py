"""The notebooks: committed without outputs, in step with their jupytext .py pair, and executing top to bottom
(nbclient, a python3 kernel on this interpreter) against a store built with the tiny checkpoint."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import index_dir, photo
from PIL import Image

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PAIRS = ["clustering", "quickstart"]


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one cell tagged `parameters`"
    return cells[0]


# -- committed form ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAIRS)
def test_ipynb_has_no_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}.ipynb: strip the outputs"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("name", PAIRS)
def test_ipynb_matches_its_py_pair(name: str) -> None:
    """Edit the .py (or the notebook) and run `jupytext --sync notebooks/*.py`: the pair must not drift."""
    import jupytext

    from_py = jupytext.read(NOTEBOOKS / f"{name}.py")
    ipynb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)

    def shape(nb: nbformat.NotebookNode) -> list[tuple[str, str, list[str]]]:
        return [(c.cell_type, c.source.strip(), sorted(c.get("metadata", {}).get("tags", []))) for c in nb.cells]

    assert shape(from_py) == shape(ipynb), f"notebooks/{name}.ipynb and .py differ: run `jupytext --sync`"
    assert ipynb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    assert "STORE" in parameters_cell(ipynb).source


# -- execution ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A `python3` kernelspec pinned to this interpreter (the venv), found first through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (nsfw-index venv)",
                "language": "python",
            }
        )
    )
    return {"JUPYTER_PATH": str(root), "MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated photos with near-duplicate families (resized, re-encoded) and an exact copy."""
    d = tmp_path_factory.mktemp("nbcorpus") / "images"
    d.mkdir()
    for f in range(3):
        img = photo(300 + f, (96, 80))
        img.save(d / f"fam{f}.png")
        img.resize((72, 60), Image.BICUBIC).save(d / f"fam{f}_small.png")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75)
        (d / f"fam{f}_q75.jpg").write_bytes(buf.getvalue())
    for s in range(9):
        photo(400 + s, (90, 72)).save(d / f"solo{s}.png")
    shutil.copy(d / "solo0.png", d / "solo0_copy.png")
    return d


@pytest.fixture(scope="module")
def built_store(tmp_path_factory: pytest.TempPathFactory, corpus: Path, checkpoint: Path) -> Path:
    """A store of the corpus with a human label, so that a cluster is flagged."""
    from search.labels import label_images
    from search.settings import Settings
    from search.store import Store

    store = tmp_path_factory.mktemp("nbstore") / "store"
    settings = Settings(model=str(checkpoint), workers=0, device="cpu")
    index_dir(store, [str(corpus)], settings)
    with Store(store) as handle:
        label_images(handle, [str(corpus / "fam0_small.png")], "unsafe", settings, who="test")
    return store


def execute(
    name: str, params: dict[str, object], cwd: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cell = parameters_cell(nb)
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())  # papermill-style: our values replace the cell
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, allow_errors=False, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def pngs(cell: nbformat.NotebookNode) -> list[bytes]:
    return [
        base64.b64decode(o["data"]["image/png"])
        for o in cell.get("outputs", [])
        if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    ]


def text_of(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(
                o.get("text", "") if o.get("output_type") == "stream" else str(o.get("data", {}).get("text/plain", ""))
            )
    return "\n".join(out)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_clustering_notebook_runs_on_search_alone(
    built_store: Path, corpus: Path, kernel_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    shutil.copytree(built_store, store)
    nb = execute(
        "clustering",
        {
            "STORE": str(store),
            "BLUR_ABOVE": 1.0,  # no score reaches it: only being known-unsafe blurs (the human label below)
            "THRESHOLD": 0.95,
            "N_CLUSTERS": None,
            "RUN_CLUSTERING": True,
            "TOP_CLUSTERS": 12,
            "GRID_GROUPS": 4,
            "GRID_UNSAFE_CLUSTERS": 3,
            "GRID_COLUMNS": 6,
            "MAX_POINTS": 20000,
            "SWEEP": [0.8, 0.9, 0.95, 0.99],
            "SWEEP_MAX_IMAGES": 20000,
        },
        tmp_path,
        kernel_env,
        monkeypatch,
    )
    figures = [c for c in nb.cells if "figure" in c.get("metadata", {}).get("tags", [])]
    assert len(figures) == 6  # sizes, score boxes, projection, group grid, unsafe-cluster grid, threshold sweep
    for cell in figures:
        images = pngs(cell)
        assert images, f"no figure from:\n{cell.source[:200]}"
        assert Image.open(io.BytesIO(images[0])).size[0] > 100
    text = text_of(nb)
    assert "done without torch" in text and "first clustering" in text
    # the clustering it ran is in the store: 3 families + the exact copy
    from search.clusters import cluster_summary
    from search.settings import Settings
    from search.store import Store

    with Store(store, readonly=True) as s:
        summary = cluster_summary(s, Settings(nsfw_threshold=1.0))
    assert summary is not None and summary.groups == 4 and summary.flagged_groups == 1
    # every known-unsafe image shown is blurred, the human-labelled one included, whatever its score
    with Store(store, readonly=True) as s:
        human = s.resolve_image(str(corpus / "fam0_small.png"))
    shown = re.search(r"known-unsafe shown \(all blurred\): \[([0-9, ]*)\]", text)
    assert shown is not None and human in [int(x) for x in shown.group(1).split(",") if x.strip()]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quickstart_notebook_runs(
    corpus: Path, checkpoint: Path, kernel_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "qs-store"
    nb = execute(
        "quickstart",
        {"MODEL": str(checkpoint), "IMAGES": str(corpus), "STORE": str(store), "DEVICE": "cpu", "WORKERS": 0},
        tmp_path,
        kernel_env,
        monkeypatch,
    )
    text = text_of(nb)
    assert "'new_images': 18" in text and "nearest_unsafe" in text and "flagged_clusters" in text
    from search.store import Store

    with Store(store, readonly=True) as s:
        assert s.count_images() == 18
        assert s.db.execute("SELECT COUNT(*) FROM labels WHERE label = 'unsafe'").fetchone()[0] == 1
        assert s.db.execute("SELECT COUNT(*) FROM clusterings").fetchone()[0] == 1
