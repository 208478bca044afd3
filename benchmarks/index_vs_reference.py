"""End-to-end indexing against the reference package, whole processes in one run (model load included).

    .venv/bin/pip install 'nsfw-index[bench]'        # the reference: nsfw-image-detector 0.1.2
    .venv/bin/python benchmarks/index_vs_reference.py [--model DIR] [--rounds 2] [--fp32-baseline]

Corpus: benchmarks/photos.py (21 real photographs and 4 transformed copies of each: 105 files, distinct bytes).
Without --model it generates the full-size EVA-02 base/448 in the Freepik layout with random weights (the compute
of the real checkpoint; not its answers). Each round runs, one after the other:
  reference  `NSFWDetector(model_name=DIR, device="cpu").predict_proba` in batches of 16 (its bf16 default)
  default    `nsfw-index index CORPUS --store NEW --model DIR` (auto backend and dtype)
  int8       the same with `--dtype int8`
and prints each wall time, peak RSS and the ratio reference/ours. Exported graphs are built once before the rounds
(their one-time cost is printed apart). --fp32-baseline also indexes with `--backend torch --dtype fp32` once and
reports each variant's drift from it on the same images. Writes benchmarks/out/index_vs_reference.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

REFERENCE = r"""
import json, sys, pathlib
from PIL import Image
from nsfw_image_detector import NSFWDetector
model, listing, out = sys.argv[1], sys.argv[2], sys.argv[3]
files = pathlib.Path(listing).read_text().split("\n")
det = NSFWDetector(model_name=model, device="cpu")
res = {}
for i in range(0, len(files), 16):
    chunk = files[i:i + 16]
    ims = [Image.open(f).convert("RGB") for f in chunk]
    for f, p in zip(chunk, det.predict_proba(ims)):
        res[f] = {str(k.value if hasattr(k, "value") else k): float(v) for k, v in p.items()}
pathlib.Path(out).write_text(json.dumps(res))
"""


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Wall seconds, peak RSS in MiB (the largest of the process and the children it waited for, from wait4) and
    what it printed."""
    with open(OUT / ".stdout", "w+b") as so, open(OUT / ".stderr", "w+b") as se:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=so, stderr=se, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0)
        se.seek(0)
        out, err = so.read().decode(), se.read().decode()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({p.returncode}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "stdout": out, "stderr": err}


def stored(store: Path) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """sha256 -> (probabilities, embedding, level) read from a finished store (read-only)."""
    con = sqlite3.connect(f"file:{store / 'meta.sqlite'}?mode=ro", uri=True)
    rows = con.execute("SELECT sha256, p_neutral, p_low, p_medium, p_high, embedding, level FROM images").fetchall()
    con.close()
    return {r[0]: (np.array(r[1:5]), np.frombuffer(r[5], np.float32), r[6]) for r in rows}


def drift(ours: dict, base: dict) -> dict[str, float]:
    common = sorted(set(ours) & set(base))
    prob = max(float(np.abs(ours[s][0] - base[s][0]).max()) for s in common)
    cos = min(float(ours[s][1] @ base[s][1]) for s in common)
    agree = float(np.mean([ours[s][2] == base[s][2] for s in common]))
    return {
        "images": len(common),
        "max_prob_diff": round(prob, 5),
        "min_cosine": round(cos, 6),
        "level_agreement": agree,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fp32-baseline", action="store_true")
    ap.add_argument("--variants", default="default,int8")
    args = ap.parse_args()
    try:
        import nsfw_image_detector  # noqa: F401
    except ImportError:
        raise SystemExit("the reference is not installed: .venv/bin/pip install 'nsfw-index[bench]'") from None
    from photos import write_corpus

    OUT.mkdir(exist_ok=True)
    work = OUT / "index_vs_reference"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    model = args.model
    if model is None:
        model = str(OUT / "full-size-ckpt")
        if not (Path(model) / "model.safetensors").is_file():
            from conftest import make_checkpoint

            make_checkpoint(Path(model), full_size=True)
    corpus = work / "corpus"
    files = write_corpus(corpus)
    listing = work / "files.txt"
    listing.write_text("\n".join(str(f) for f in files))
    exe = str(Path(sys.executable).parent / "nsfw-index")
    cache = {"NSFW_INDEX_CACHE_DIR": str(OUT / "export-cache")}
    flags = {"default": [], "int8": ["--dtype", "int8"], "torch-fp32": ["--backend", "torch", "--dtype", "fp32"]}
    variants = [v for v in args.variants.split(",") if v]

    one_time = {}
    for v in variants:  # build (or find) each exported graph once: its cost is paid on first use only
        r = run([exe, "score", str(files[0]), "--model", model, "--json", *flags[v]], cache)
        one_time[v] = {"first_score_s": r["wall_s"], "built": "building" in r["stderr"]}

    def index(v: str, tag: str) -> dict[str, Any]:
        store = work / f"store-{tag}"
        shutil.rmtree(store, ignore_errors=True)
        r = run([exe, "index", str(corpus), "--store", str(store), "--model", model, "--json", *flags[v]], cache)
        summary = json.loads(r["stdout"].strip().splitlines()[-1])
        assert summary["new_images"] == len(files), summary
        keep = ("model_share", "startup", "timings", "engine")
        return {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"], "store": str(store)} | {
            k: summary[k] for k in keep
        }

    rounds = []
    for i in range(args.rounds):
        row: dict[str, Any] = {}
        r = run([sys.executable, "-c", REFERENCE, model, str(listing), str(work / f"ref{i}.json")])
        row["reference"] = {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"]}
        for v in variants:
            row[v] = index(v, f"{v}-{i}")
            row[v]["ratio_vs_reference"] = round(row["reference"]["wall_s"] / row[v]["wall_s"], 3)
        rounds.append(row)
        shown = {k: {kk: vv for kk, vv in d.items() if kk not in ("timings", "store")} for k, d in row.items()}
        print(json.dumps(shown), flush=True)

    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "images": len(files),
        "model": args.model or "EVA-02 base/448, Freepik layout, random weights (generated)",
        "cpu_count": os.cpu_count(),
        "one_time_export": one_time,
        "rounds": rounds,
    }
    if args.fp32_baseline:
        base_run = index("torch-fp32", "fp32")
        base = stored(Path(base_run["store"]))
        out["torch_fp32"] = {k: base_run[k] for k in ("wall_s", "model_share", "engine")}
        out["torch_fp32"]["ratio_vs_reference"] = round(rounds[-1]["reference"]["wall_s"] / base_run["wall_s"], 3)
        out["drift_vs_torch_fp32"] = {v: drift(stored(Path(rounds[-1][v]["store"])), base) for v in variants}
        ref = json.loads((work / f"ref{args.rounds - 1}.json").read_text())
        levels = ("neutral", "low", "medium", "high")
        ref_p = {}
        for f, sc in ref.items():  # the reference answers cumulative scores: back to the 4 probabilities
            p = np.array([sc["neutral"], sc["low"] - sc["medium"], sc["medium"] - sc["high"], sc["high"]])
            ref_p[hashlib.sha256(Path(f).read_bytes()).hexdigest()] = p
        common = sorted(set(ref_p) & set(base))
        out["drift_vs_torch_fp32"]["reference (torch bf16)"] = {
            "images": len(common),
            "max_prob_diff": round(max(float(np.abs(ref_p[k] - base[k][0]).max()) for k in common), 5),
            "level_agreement": float(np.mean([levels[int(ref_p[k].argmax())] == base[k][2] for k in common])),
        }
        print(json.dumps({"torch_fp32": out["torch_fp32"], "drift": out["drift_vs_torch_fp32"]}), flush=True)
    for row in rounds:
        for v in variants:
            row[v].pop("store", None)
    (OUT / "index_vs_reference.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {OUT / 'index_vs_reference.json'}")


if __name__ == "__main__":
    main()
