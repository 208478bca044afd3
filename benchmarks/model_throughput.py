"""Forward-pass throughput of EVA-02 base 448 (the Freepik architecture): fp32 against bf16, per batch size.

    .venv/bin/python benchmarks/model_throughput.py [--model DIR] [--device cpu|cuda] [--batches 1,8] [--iters 3]

Without --model it generates the real architecture with random weights (the compute is the same as the real
checkpoint's; the answers are not). fp32 is the baseline of each row; writes benchmarks/out/model_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch
    from conftest import make_checkpoint, photo

    from indexer.extractor import Extractor
    from indexer.model import load_model
    from search.settings import Settings

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(make_checkpoint(Path(tmp) / "ckpt", full_size=True))
        loaded = load_model(model)
        tensors = None
        for bs in (int(b) for b in args.batches.split(",")):
            row: dict[str, object] = {"batch": bs}
            ref = None
            for dtype in ("fp32", "bf16"):
                ex = Extractor(
                    load_model(model) if dtype == "bf16" else loaded,
                    Settings(
                        model=model,
                        device=args.device,
                        backend="torch",
                        dtype=dtype,
                        batch_size=bs,
                        threads=args.threads,
                    ),
                )
                if tensors is None:
                    tensors = torch.stack([ex.preprocess(photo(i, (640, 480))) for i in range(max(8, bs))])
                x = tensors[:bs]
                ex.run(x)  # warm-up
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    res = ex.run(x)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) / args.iters
                row[f"{dtype}_img_per_s"] = round(bs / dt, 3)
                if ref is None:
                    ref = res
                else:
                    row["bf16_min_cosine_to_fp32"] = round(
                        min(float(a.embedding @ b.embedding) for a, b in zip(ref, res, strict=True)), 5
                    )
            row["bf16_over_fp32"] = round(float(row["bf16_img_per_s"]) / float(row["fp32_img_per_s"]), 2)
            rows.append(row)
            print(row, flush=True)
    out = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model or "EVA-02 base 448, random weights",
        "rows": rows,
    }
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "model_throughput.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
