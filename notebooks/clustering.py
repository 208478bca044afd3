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
# # Clusters and near-duplicate groups of a store
#
# Review a corpus cluster by cluster. This notebook opens a store through `search` alone (numpy, faiss, scipy; no
# torch, no model) and shows:
#
# 1. the sizes of the k-means clusters and of the near-duplicate groups,
# 2. the NSFW score distribution inside the biggest clusters,
# 3. a 2-D projection of the embeddings (PCA; UMAP when `umap-learn` is installed) coloured by level and by
#    known-unsafe,
# 4. thumbnails of the largest near-duplicate groups and of the clusters around known-unsafe images (every
#    known-unsafe image is blurred, whatever its source: human, hash list or model; so is every image whose score
#    reaches `BLUR_ABOVE`),
# 5. a threshold sweep (number and sizes of groups against the cosine threshold T) to help pick T.
#
# Run `nsfw-index cluster --store STORE` first, or leave `RUN_CLUSTERING = True` to compute clusters here when the
# store has none or they are stale. In a store created with `nsfw-index index --thumbnails` the thumbnails come from
# the store (its server-side blurred variant for the blurred ones) and no file is read; otherwise they are read from
# the paths stored in the index: this notebook is for reviewers who may see the corpus.

# %% tags=["parameters"]
STORE = "demo-store"  # the store directory
BLUR_ABOVE = 0.5  # blur thumbnails whose score (at the configured level) reaches this; known-unsafe always blur
THRESHOLD = None  # near-duplicate cosine threshold; None: the settings default (0.90)
N_CLUSTERS = None  # k-means K; None: the default from N
RUN_CLUSTERING = True  # compute (or refresh) the clustering when missing or stale; needs the writer lock
TOP_CLUSTERS = 12  # clusters in the score box plot
GRID_GROUPS = 4  # near-duplicate groups shown as thumbnail rows
GRID_UNSAFE_CLUSTERS = 3  # flagged clusters shown as thumbnail rows
GRID_COLUMNS = 6
MAX_POINTS = 20_000  # sample for the projection
SWEEP = [0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98]
SWEEP_MAX_IMAGES = 20_000

# %%
import io
import sys
import tarfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Image as PNG
from IPython.display import display
from PIL import Image, ImageFilter, ImageOps

from search.answers import ClusterSummary
from search.clusters import cluster_summary, get_cluster, list_clusters, load_vectors, memberships, run_clustering
from search.graph import threshold_sweep
from search.settings import LEVELS, Settings
from search.store import Store

settings = Settings.from_flags(store=STORE, near_duplicate_threshold=THRESHOLD)
LEVEL = settings.nsfw_level


def show(fig):
    """Render a figure to PNG with the Agg backend and display it (works in any kernel, and in tests)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    display(PNG(data=buf.getvalue()))


# %% [markdown]
# ## The clustering
# `fresh` is false when images were added or removed since the clustering ran. Flags are computed now, from the
# current labels, hash-list matches and model scores, so they are never stale.

# %%
store = Store(STORE, readonly=True)
summary = cluster_summary(store, settings)
if RUN_CLUSTERING and (
    summary is None or not summary.fresh or (THRESHOLD is not None and summary.threshold != THRESHOLD)
):
    with Store.writing(STORE, "nsfw-index cluster") as writer:  # opens writable and takes the writer lock
        out = run_clustering(writer, settings, threshold=THRESHOLD, n_clusters=N_CLUSTERS, log=print)
    summary = cluster_summary(store, settings)
if summary is None:
    raise SystemExit(f"{STORE} has no clustering yet: run `nsfw-index cluster --store {STORE}`")
pd.Series({k: v for k, v in summary.to_json().items() if k != "timings"}, dtype=object)

# %%
ids, X = load_vectors(store)
rows = store.images(ids.tolist())
images = pd.DataFrame(
    {"level": [rows[i].level for i in ids], **{f"s_{lv}": [rows[i].scores[lv] for i in ids] for lv in LEVELS}},
    index=pd.Index(ids, name="id"),
)
unsafe = store.known_unsafe(settings)
images["known_unsafe"] = images.index.isin(list(unsafe))
images["score"] = images[f"s_{LEVEL}"]
images["cluster"] = pd.Series(memberships(store, "cluster"))
images["group"] = pd.Series(memberships(store, "group"))


def every(kind):
    """Every group or cluster of the latest clustering, page by page, as a DataFrame indexed by id."""
    items, page = [], 1
    while True:
        got = list_clusters(store, settings, kind=kind, page=page, per_page=1000)
        items += [item.to_json() for item in got.items]
        if page * got.per_page >= got.total:
            break
        page += 1
    return pd.DataFrame(items, columns=list(ClusterSummary.model_fields)).set_index("id")


clusters = every("cluster")
group_sizes = every("group")
print(
    f"{len(ids)} images, {len(clusters)} clusters, {len(group_sizes)} near-duplicate groups, "
    f"{len(unsafe)} known-unsafe images"
)
clusters.head(10)

# %% [markdown]
# ## Cluster and group sizes

# %% tags=["figure"]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
axes[0].hist(clusters["size"], bins=min(40, max(5, len(clusters))), color="#4477aa")
axes[0].set(title=f"k-means cluster sizes (K={summary.k})", xlabel="images in cluster", ylabel="clusters")
if len(group_sizes):
    counts = group_sizes["size"].value_counts().sort_index()
    axes[1].bar(counts.index.astype(str), counts.values, color="#aa7744")
else:
    axes[1].text(0.5, 0.5, "no near-duplicate groups", ha="center", va="center")
axes[1].set(title=f"near-duplicate group sizes (T={summary.threshold})", xlabel="images in group", ylabel="groups")
show(fig)

# %% [markdown]
# ## NSFW score inside the biggest clusters
# One box per cluster (score at the configured level, `medium` by default); a red label marks a flagged cluster.

# %% tags=["figure"]
top = clusters.sort_values(["size"], ascending=False).head(TOP_CLUSTERS)
data = [images.loc[images["cluster"] == cid, "score"].to_numpy() for cid in top.index]
fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(top) + 2), 3.8))
ax.boxplot(data, showfliers=True)
ax.set_xticks(range(1, len(top) + 1), [f"{cid}\n(n={n})" for cid, n in zip(top.index, top["size"], strict=True)])
for tick, flagged in zip(ax.get_xticklabels(), top["flagged"], strict=True):
    tick.set_color("red" if flagged else "black")
ax.axhline(settings.nsfw_threshold, ls="--", color="grey", lw=1)
ax.set(
    title=f"{LEVEL} score by cluster (biggest {len(top)})",
    xlabel="cluster id",
    ylabel=f"{LEVEL} score",
    ylim=(-0.02, 1.02),
)
show(fig)

# %% [markdown]
# ## 2-D projection
# PCA of (a sample of) the embeddings; UMAP (cosine) instead when `umap-learn` is installed.

# %% tags=["figure"]
rng = np.random.default_rng(0)
pick = np.sort(rng.choice(len(ids), min(len(ids), MAX_POINTS), replace=False))
sample = X[pick]
try:
    import umap  # type: ignore[import-not-found]

    xy = umap.UMAP(metric="cosine", random_state=0).fit_transform(sample)
    method = "UMAP"
except ImportError:
    centred = sample - sample.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T if vt.shape[0] >= 2 else np.c_[centred @ vt[:1].T, np.zeros(len(sample))]
    method = "PCA"
meta = images.loc[ids[pick]]
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
palette = dict(zip(LEVELS, ["#44aa77", "#ddbb33", "#ee7733", "#cc3311"], strict=True))
for lv in LEVELS:
    m = (meta["level"] == lv).to_numpy()
    axes[0].scatter(xy[m, 0], xy[m, 1], s=8, c=palette[lv], label=f"{lv} ({m.sum()})")
axes[0].legend(markerscale=2, fontsize=8)
axes[0].set_title(f"{method}, coloured by level")
bad = meta["known_unsafe"].to_numpy()
axes[1].scatter(xy[~bad, 0], xy[~bad, 1], s=8, c="#bbbbbb", label=f"not known-unsafe ({(~bad).sum()})")
axes[1].scatter(xy[bad, 0], xy[bad, 1], s=14, c="#cc3311", label=f"known-unsafe ({bad.sum()})")
axes[1].legend(markerscale=2, fontsize=8)
axes[1].set_title(f"{method}, known-unsafe in red")
show(fig)

# %% [markdown]
# ## Thumbnails
# Blurred for every known-unsafe image (any source) and whenever the score reaches `BLUR_ABOVE`. From the store's own
# thumbnails when it keeps them (the blurred ones are its server-side blurred variant), else loaded from the stored
# paths (files, or `shard.tar::member`). A red title marks a known-unsafe image.

# %%
paths = store.paths_of(images.index.tolist())
stored_thumbnails = store.thumbnails_enabled()
shown_blurred, shown_clear = set(), set()


def must_blur(image_id):
    """Every known-unsafe image (human, hash_list or model) and everything scoring at least BLUR_ABOVE."""
    return bool(images.at[image_id, "known_unsafe"]) or images.at[image_id, "score"] >= BLUR_ABOVE


def thumbnail(image_id, size=128):
    """A small RGB thumbnail of the image, blurred when `must_blur`: the store's own, else from its stored paths."""
    blurred = must_blur(image_id)
    (shown_blurred if blurred else shown_clear).add(image_id)
    if stored_thumbnails:  # kept in the store: no file is read, and a blurred one never had its pixels here
        data = store.thumbnail(image_id, blurred=blurred)
        if data is None:
            return Image.new("RGB", (size, size), (200, 200, 200)), blurred
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.thumbnail((size, size))
        return img, blurred
    img = None
    for p in paths.get(image_id, []):
        try:
            if "::" in p:
                shard, member = p.split("::", 1)
                with tarfile.open(shard) as tf:
                    data = tf.extractfile(member).read()
                img = Image.open(io.BytesIO(data))
            elif Path(p).is_file():
                img = Image.open(p)
            else:
                continue
            img.draft("RGB", (size * 2, size * 2))
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((size, size))
            break
        except Exception:  # a moved or unreadable file: try the next path, else a grey tile
            img = None
    if img is None:
        return Image.new("RGB", (size, size), (200, 200, 200)), blurred
    if blurred:
        img = img.filter(ImageFilter.GaussianBlur(radius=max(4, size // 12)))
    return img, blurred


def grid(rows, title):
    """rows: list of (label, [image ids]); one row of thumbnails each."""
    rows = [r for r in rows if r[1]]
    if not rows:
        print(f"{title}: nothing to show")
        return
    cols = max(len(r[1][:GRID_COLUMNS]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.1 * len(rows)), squeeze=False)
    for r, (label, members) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(members[:GRID_COLUMNS]):
                continue
            image_id = members[c]
            img, blurred = thumbnail(image_id)
            ax.imshow(img)
            colour = "red" if images.at[image_id, "known_unsafe"] else "black"
            ax.set_title(
                f"#{image_id} {images.at[image_id, 'score']:.2f}" + (" (blur)" if blurred else ""),
                fontsize=8,
                color=colour,
            )
            if c == 0:
                ax.text(-0.1, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=9)
    fig.suptitle(title)
    show(fig)


# %% [markdown]
# ### The largest near-duplicate groups

# %% tags=["figure"]
largest = list_clusters(store, settings, kind="group", sort="size", per_page=GRID_GROUPS).items
grid(
    [
        (
            f"group {g.id}\n{g.size} images\n{g.path_count} paths",
            [m.id for m in get_cluster(store, settings, g.id, limit=GRID_COLUMNS).members],
        )
        for g in largest
    ],
    f"largest near-duplicate groups (T={summary.threshold})",
)

# %% [markdown]
# ### Clusters around known-unsafe images
# The clusters with the most known-unsafe members, known-unsafe members first, then the rest by similarity to the
# representative: what else sits near removed material.

# %% tags=["figure"]
flagged = [
    c
    for c in list_clusters(store, settings, kind="cluster", sort="unsafe", per_page=GRID_UNSAFE_CLUSTERS).items
    if c.flagged
]
grid_rows = []
for c in flagged:
    members = get_cluster(store, settings, c.id).members
    ordered = [m.id for m in members if m.sources] + [m.id for m in members if not m.sources]
    grid_rows.append((f"cluster {c.id}\n{c.unsafe_count}/{c.size}\nunsafe", ordered))
grid(grid_rows, "clusters holding known-unsafe images")

# %%
unsafe_shown = sorted(i for i in shown_blurred | shown_clear if images.at[i, "known_unsafe"])
assert set(unsafe_shown) <= shown_blurred, "a known-unsafe image was shown unblurred"
print(f"thumbnails: {len(shown_blurred)} blurred {sorted(shown_blurred)}, {len(shown_clear)} not blurred")
print(f"known-unsafe shown (all blurred): {unsafe_shown}")

# %% [markdown]
# ## Picking the threshold
# Number of near-duplicate groups and images in them against T (on a sample of `SWEEP_MAX_IMAGES` for big stores).
# Near-duplicates (re-encodes, resizes, small crops) sit well above the knee; below it, distinct images of one
# subject start to merge and the largest group grows fast.

# %% tags=["figure"]
sweep = pd.DataFrame(threshold_sweep(X, SWEEP, max_images=SWEEP_MAX_IMAGES))
fig, ax = plt.subplots(figsize=(7, 3.6))
ax.plot(sweep["threshold"], sweep["groups"], "o-", label="groups")
ax.plot(sweep["threshold"], sweep["grouped_images"], "s-", label="images in groups")
ax.plot(sweep["threshold"], sweep["largest"], "^-", label="largest group")
ax.axvline(summary.threshold, ls="--", color="grey", lw=1, label=f"current T={summary.threshold}")
ax.set(
    xlabel="cosine threshold T",
    ylabel="count",
    title="near-duplicate groups against T"
    + (f" (sample of {sweep['images'].iloc[0]})" if sweep["sampled"].iloc[0] else ""),
)
ax.legend(fontsize=8)
show(fig)
sweep

# %%
store.close()
assert "torch" not in sys.modules, "this notebook must run on search alone (no torch)"
print("done without torch")
