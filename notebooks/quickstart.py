# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # nsfw-index from Python: a quickstart
#
# The same steps as the `nsfw-index` command line, from Python:
#
# 1. **index** a folder into a store (NSFW scores, an embedding and a PDQ hash per image, content-deduplicated),
# 2. **score** files without a store,
# 3. **label** an image unsafe (an append-only event log; labels survive re-indexing),
# 4. **query** with a new image: its scores, the nearest known-unsafe images, near-duplicates and PDQ matches,
# 5. **cluster** the store and list the clusters that hold known-unsafe images.
#
# `MODEL` is the Hugging Face repo `Freepik/nsfw_image_detector` (downloaded once into the Hugging Face cache) or a
# local directory with `config.json` + `model.safetensors`.

# %% tags=["parameters"]
MODEL = "Freepik/nsfw_image_detector"  # or a local directory with config.json + model.safetensors
IMAGES = "images"  # a folder of images to index
STORE = "quickstart-store"  # the store directory (created when missing)
DEVICE = None  # "cpu" or "cuda"; None: cuda when available
WORKERS = None  # decode processes; None: cores - 1; 0: decode in this process

# %%
import json
from pathlib import Path

from indexer.analyze import analyze, query_answer
from indexer.corpus import IMAGE_EXTENSIONS
from indexer.extractor import Extractor
from indexer.files import score_files
from indexer.service import index_inputs
from search.clusters import list_clusters, run_clustering
from search.labels import label_images
from search.query import Searcher
from search.settings import Settings
from search.store import Store

# One settings object: what you pass here, else NSFW_INDEX_* environment variables, else the defaults.
settings = Settings.from_flags(model=MODEL, store=STORE, device=DEVICE, workers=WORKERS)
extractor = Extractor.from_settings(settings)  # load the model once and reuse it below
print(extractor.identity.as_dict())

# %% [markdown]
# ## 1. Index a folder
# `Store.writing` opens the store and takes its writer lock; `index_inputs` walks the folder (tar shards too), decodes
# safely, and writes every image once per content hash. Running it again only processes new or changed files.

# %%
with Store.writing(STORE, "quickstart index", create=True) as store:
    summary = index_inputs(store, [IMAGES], settings, extractor=extractor)
print(summary.counts())
print({stage: round(seconds, 2) for stage, seconds in summary.timings.items()})

# %% [markdown]
# ## 2. Score files without a store
# `score_files` yields `(path, result)` in input order; a file that cannot be decoded yields its error instead.

# %%
files = sorted(p for p in Path(IMAGES).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
for path, result in score_files(files[:5], settings, extractor=extractor):
    if isinstance(result, Exception):
        print(f"{path.name}: error {result}")
    else:
        print(
            f"{path.name}: level={result.level} is_nsfw={result.is_nsfw} "
            f"scores={ {k: round(v, 3) for k, v in result.scores.items()} }"
        )

# %% [markdown]
# ## 3. Label an image unsafe
# Images are named by id, stored path or sha256. Known-unsafe = labelled unsafe by a human, or matched by an imported
# PDQ hash list, or (unless a human said safe) scored at or above the threshold by the model.

# %%
removed = files[0]
with Store(STORE) as store:
    events = label_images(
        store, [str(removed.resolve())], "unsafe", settings, who="quickstart", reason="example: removed by a reviewer"
    )
    counts = store.counts(settings)
print([event.to_json() for event in events])
print(counts["images"], "images;", counts["known_unsafe"])

# %% [markdown]
# ## 4. Query with an image
# `analyze` decodes, hashes and runs the model once; `query_answer` adds the nearest known-unsafe images (with the
# reasons they are known-unsafe), the near-duplicates in the whole corpus and the PDQ matches. Its `to_json()` is what
# `nsfw-index query --json` prints and `POST /v1/query` returns. The image queried here is already indexed: the
# answer gives its `indexed_id`, leaves the image itself out of its neighbours and lists its `exact_duplicates`.

# %%
searcher = Searcher.open(STORE, settings)
query = files[min(1, len(files) - 1)]
(analysis,) = analyze(extractor, [(query.name, query.read_bytes())], settings)
answer = query_answer(analysis, searcher, k=3).to_json()
shown = ("nsfw", "indexed_id", "exact_duplicates", "nearest_unsafe", "near_duplicates", "pdq")
print(json.dumps({k: answer.get(k) for k in shown}, indent=1)[:3000])
assert answer["indexed_id"] not in [n["id"] for n in answer["near_duplicates"]]  # not its own near-duplicate

# %% [markdown]
# An indexed image can be queried by id without running the model again:

# %%
neighbours = searcher.neighbours(events[0].id, k=3).to_json()
print({k: neighbours[k] for k in ("id", "known_unsafe_sources", "exact_duplicates")})
print("near-duplicates:", neighbours["near_duplicates"][:5])
searcher.close()

# %% [markdown]
# ## 5. Cluster
# Near-duplicate groups (cosine >= 0.90 by default) and k-means clusters, stored in the store; a group or cluster is
# flagged when it holds a known-unsafe image. See `clustering.ipynb` for the analysis.

# %%
with Store.writing(STORE, "quickstart cluster") as store:
    out = run_clustering(store, settings, log=print).to_json()
print({k: out.get(k) for k in ("images", "groups", "clusters", "flagged_groups", "flagged_clusters", "reason")})
with Store(STORE, readonly=True) as store:
    for item in list_clusters(store, settings, kind="cluster", sort="unsafe", per_page=3).items:
        print(item.to_json())
