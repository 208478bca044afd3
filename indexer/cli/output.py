"""What the verbs print without `--json`: tables and summary lines, from the engine's typed answers."""

from __future__ import annotations

from typing import Any

import click

from indexer.summary import RunSummary
from search.answers import ClusteringSummary, HashListImport, LabelResult, QueryAnswer
from search.settings import LEVELS


def print_score_table(rows: list[dict[str, Any]]) -> None:
    """`score`: one row per image (the rows are what `--json` prints: `path` and the Nsfw fields, or `error`)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("level", "nsfw", *LEVELS)
    table.add_column("path", overflow="fold")  # last, and never cut: users copy paths out of this table
    for r in rows:
        if "error" in r:
            table.add_row("[red]error[/red]", "", "", "", "", "", f"{r['path']}: {r['error']}")
            continue
        s = r["scores"]
        table.add_row(r["level"], "yes" if r["is_nsfw"] else "no", *(f"{s[k]:.3f}" for k in LEVELS), r["path"])
    console = Console()
    if not console.is_terminal:  # piped: wide enough that no path is folded
        console = Console(width=max(100, 60 + max((len(r["path"]) + len(r.get("error", "")) for r in rows), default=0)))
    console.print(table)


def print_query(path: str, ans: QueryAnswer | None, error: str | None = None) -> None:
    """`query`: the verdict, then one line per known-unsafe neighbour, near-duplicate and PDQ match."""
    if ans is None:
        click.echo(f"{path}: error: {error}")
        return
    n = ans.nsfw
    click.echo(
        f"{path}: {n.level} (medium {n.scores['medium']:.3f}, high {n.scores['high']:.3f})"
        f"{' NSFW' if n.is_nsfw else ''}" + (f"  [indexed as id {ans.indexed_id}]" if ans.indexed_id else "")
    )
    for nb in ans.nearest_unsafe:
        click.echo(
            f"  unsafe  id {nb.id:>7}  sim {nb.similarity:.3f}  {nb.level:<7} "
            f"{'+'.join(nb.sources):<22} {nb.paths[0] if nb.paths else ''}"
        )
    for dup in ans.near_duplicates:
        click.echo(f"  near-dup id {dup.id:>6}  sim {dup.similarity:.3f}")
    pdq = ans.pdq
    click.echo(f"  pdq {pdq.hash} quality {pdq.quality}, {len(pdq.matches)} match(es)")
    for m in pdq.matches:
        what = f"list {m.list}" if m.source == "hash_list" else f"labelled id {m.id}"
        click.echo(f"    pdq match: {what} distance {m.distance}")


def print_index_summary(summary: RunSummary, *, pruned: bool) -> None:
    """`index`: the counts, the stage seconds and the first errors, on stderr."""
    c = summary.counts()
    click.echo(
        f"run {summary.run_id}: {c['seen']} files seen, {c['new_images']} new images, "
        f"{c['duplicate_paths']} exact-duplicate paths, {c['unchanged']} unchanged, {c['errors']} errors"
        + (f", pruned {c['pruned_paths']} paths / {c['pruned_images']} images" if pruned else ""),
        err=True,
    )
    click.echo("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.timings.items()), err=True)
    for key, reason in summary.error_samples[:10]:
        click.echo(f"  error: {key}: {reason}", err=True)


def print_stats(d: dict[str, Any]) -> None:
    """`stats`, from its JSON form."""
    lines = [
        f"images: {d['images']}   paths: {d['paths']}   exact-duplicate images: {d['exact_duplicates']['images']}"
        f"   errors: {d['errors']}",
        "levels: " + ", ".join(f"{k} {v}" for k, v in d["levels"].items()),
        "known-unsafe: " + ", ".join(f"{k} {v}" for k, v in d["known_unsafe"].items()),
        f"model: {d['model'].get('architecture')} weights sha256 {str(d['model'].get('weights_sha256'))[:16]}…",
    ]
    for name, info in d["indexes"].items():
        if not info.get("exists"):
            lines.append(f"index {name}: missing (run `nsfw-index rebuild`)")
        else:
            lines.append(
                f"index {name}: {info['count']} vectors, {info['factory']}, generation {info['generation']}, "
                + ("fresh" if info["fresh"] else f"stale ({', '.join(info['stale_because']) or 'behind'})")
            )
    if d.get("recall_at_10") is not None:
        lines.append(f"recall@10 of the approximate index vs exact: {d['recall_at_10']:.3f}")
    cl = d.get("clusters")
    if cl:
        lines.append(
            f"clusters: {cl.get('clusters')} semantic, {cl.get('groups')} near-duplicate groups "
            f"(threshold {cl.get('threshold')}), {cl.get('flagged_clusters')} clusters and "
            f"{cl.get('flagged_groups')} groups flagged" + ("" if cl.get("fresh") else "; stale: re-run cluster")
        )
    click.echo("\n".join(lines))


def print_label(event: LabelResult) -> None:
    click.echo(f"id {event.id}: {event.label} (event {event.event})")


def print_import(out: HashListImport) -> None:
    """`import-hashes`: the list's size, the bad lines and the matches, on stderr."""
    click.echo(
        f"list {out.list}: {out.hashes} hashes ({out.imported} in this file), "
        f"{len(out.bad_lines)} bad lines, {out.matched_images} indexed images match",
        err=True,
    )
    for b in out.bad_lines[:20]:
        click.echo(f"  line {b.line}: {b.reason}: {b.text[:80]}", err=True)


def print_clustering(out: ClusteringSummary) -> None:
    click.echo(
        f"{out.groups} near-duplicate groups (threshold {out.threshold}), {out.clusters} clusters;"
        f" {out.flagged_groups} groups and {out.flagged_clusters} clusters hold known-unsafe images",
        err=True,
    )
