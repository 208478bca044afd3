"""What the verbs print without `--json`: tables and summary lines, from the engine's typed answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from indexer.summary import RunSummary
from search.answers import (
    ClusterDetail,
    ClusteringSummary,
    FileError,
    HashListImport,
    ImageDetail,
    LabelResult,
    Levels,
    NearDuplicate,
    NeighboursAnswer,
    QueryAnswer,
)
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


def print_query(
    path: str, ans: QueryAnswer | None, error: str | None = None, *, paths: Mapping[int, list[str]] | None = None
) -> None:
    """`query`: the verdict, then one line per known-unsafe neighbour, near-duplicate (with its paths, from `paths`)
    and PDQ match."""
    if ans is None:
        click.echo(f"{path}: error: {error}")
        return
    n = ans.nsfw
    click.echo(
        f"{path}: {n.level} (medium {n.scores['medium']:.3f}, high {n.scores['high']:.3f})"
        f"{' NSFW' if n.is_nsfw else ''}" + (f"  [indexed as id {ans.indexed_id}]" if ans.indexed_id else "")
    )
    if ans.exact_duplicates is not None and ans.exact_duplicates.paths:
        others = [p for p in ans.exact_duplicates.paths if p != path]
        if others:
            click.echo(f"  exact duplicates: {_paths_text(others)}")
    for nb in ans.nearest_unsafe:
        click.echo(
            f"  unsafe   id {nb.id:>6}  sim {nb.similarity:.3f}  {nb.level:<7} "
            f"{'+'.join(nb.sources):<22} {_paths_text(nb.paths or [])}"
        )
    _print_near_duplicates(ans.near_duplicates, paths or {})
    pdq = ans.pdq
    click.echo(f"  pdq {pdq.hash} quality {pdq.quality}, {len(pdq.matches)} match(es)")
    for m in pdq.matches:
        what = f"list {m.list}" if m.source == "hash_list" else f"labelled id {m.id}"
        turned = f" ({m.transform})" if m.transform != "original" else ""
        click.echo(f"    pdq match: {what} distance {m.distance}{turned}")
    for name, classes in ans.probes.items():
        click.echo(f"  probe {name}: " + ", ".join(f"{c} {v:.3f}" for c, v in classes.items()))


def _paths_text(paths: Sequence[str], shown: int = 2) -> str:
    """The first paths, and how many more."""
    text = ", ".join(paths[:shown])
    return text + (f" (+{len(paths) - shown} more)" if len(paths) > shown else "")


def _print_near_duplicates(dups: Sequence[NearDuplicate], paths: Mapping[int, list[str]]) -> None:
    for dup in dups:
        click.echo(f"  near-dup id {dup.id:>6}  sim {dup.similarity:.3f}  {_paths_text(paths.get(dup.id, []))}")


def print_warnings(count: int, lines: Sequence[str], *, verbose: bool) -> None:
    """How many library warnings a run captured; with -v, the warnings themselves (on stderr)."""
    if not count:
        return
    if verbose:
        click.echo(f"{count} library warning(s) captured during the run:", err=True)
        for line in lines:
            click.echo(f"  {line}", err=True)
        if count > len(lines):
            click.echo(f"  ... and {count - len(lines)} more", err=True)
    else:
        click.echo(f"{count} library warning(s) captured during the run (-v shows them)", err=True)


def print_index_summary(
    summary: RunSummary, *, pruned: bool, store: Path | None = None, warnings: int = 0, verbose: bool = False
) -> None:
    """`index`: the counts, the stage seconds, the whole error count with the first errors and where to see them
    all, and the captured warnings, on stderr."""
    c = summary.counts()
    click.echo(
        f"run {summary.run_id}: {c['seen']} files seen, {c['new_images']} new images, "
        f"{c['duplicate_paths']} exact-duplicate paths, {c['unchanged']} unchanged, {c['errors']} errors"
        + (f", {c['unchanged_errors']} unchanged files that failed before" if c["unchanged_errors"] else "")
        + (f", pruned {c['pruned_paths']} paths / {c['pruned_images']} images" if pruned else ""),
        err=True,
    )
    click.echo("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.timings.items()), err=True)
    e = summary.engine
    if e:
        share = summary.model_share
        click.echo(
            f"model: {e.get('backend')} {e.get('dtype')} on {e.get('device')} ({e.get('runtime')})"
            + (f", {share:.0%} of the indexing wall time" if share is not None else ""),
            err=True,
        )
    if summary.startup:
        click.echo(
            "start-up seconds (once per run): " + ", ".join(f"{k} {v:.2f}" for k, v in summary.startup.items()),
            err=True,
        )
    shown = summary.error_samples[:10]
    for key, reason in shown:
        click.echo(f"  error: {key}: {reason}", err=True)
    if summary.failed:
        where = f" --store {store}" if store is not None else ""
        more = f" ({len(shown)} shown above)" if shown else ""
        click.echo(f"{summary.failed} file(s) in error{more}; see them all with `nsfw-index errors{where}`", err=True)
    print_warnings(warnings, summary.warnings, verbose=verbose)


def print_stats(d: dict[str, Any]) -> None:
    """`stats`, from its JSON form."""
    lines = [
        f"images: {d['images']}   paths: {d['paths']}   exact-duplicate images: {d['exact_duplicates']['images']}"
        f"   errors: {d['errors']}",
        "levels: " + ", ".join(f"{k} {v}" for k, v in d["levels"].items()),
        "known-unsafe: " + ", ".join(f"{k} {v}" for k, v in d["known_unsafe"].items()),
        f"model: {d['model'].get('architecture')} weights sha256 {str(d['model'].get('weights_sha256'))[:16]}…",
    ]
    for v in d.get("vectors_by_backend") or []:
        made_by = f"{v['backend']} {v['dtype']} ({v['runtime']})" if v.get("backend") else "not recorded (older runs)"
        lines.append(f"vectors: {v['images']} images by {made_by}")
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
    override = ", overrides hash lists" if event.override_hash_lists else ""
    click.echo(f"id {event.id}: {event.label}{override} (event {event.event})")


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


def _levels(scores: Levels) -> str:
    return ", ".join(f"{lv} {scores[lv]:.3f}" for lv in LEVELS)


def print_image(d: ImageDetail) -> None:
    """`show`: one image in full."""
    click.echo(f"id {d.id}  sha256 {d.sha256}")
    click.echo(f"  {d.width}x{d.height} {d.format}, {d.size} bytes, indexed {d.indexed_at} (run {d.run_id})")
    click.echo(f"  level {d.level}{'  NSFW' if d.is_nsfw else ''}; scores: {_levels(d.scores)}")
    unsafe = "+".join(d.known_unsafe_sources) if d.known_unsafe_sources else "no"
    click.echo(f"  known-unsafe: {unsafe}; human label: {d.label or 'none'}")
    if d.hash_list_override is not None:
        o = d.hash_list_override
        state = "in force" if o.in_force else "no longer in force (a matching list was imported since)"
        click.echo(f"  hash-list override: event {o.event} by {o.who} at {o.at}, {state}: {o.reason or ''}")
    click.echo(f"  pdq {d.pdq.hash} quality {d.pdq.quality}")
    click.echo(f"  paths ({d.path_count}):")
    for p in d.paths or []:
        click.echo(f"    {p}")
    click.echo(f"  label history ({len(d.labels)} events):" if d.labels else "  label history: none")
    for e in d.labels:
        extra = " (overrides hash lists)" if e.override_hash_lists else ""
        click.echo(f"    event {e.event}  {e.at}  {e.label}{extra} by {e.who}" + (f": {e.reason}" if e.reason else ""))


def print_neighbours(ans: NeighboursAnswer, dup_paths: Mapping[int, list[str]]) -> None:
    """`neighbours`: the answer for an indexed image (itself left out)."""
    n = ans.nsfw
    sources = "+".join(ans.known_unsafe_sources) or "no"
    click.echo(f"id {ans.id}: {n.level}{' NSFW' if n.is_nsfw else ''} ({_levels(n.scores)}); known-unsafe: {sources}")
    ex = ans.exact_duplicates
    click.echo(f"  exact duplicates: {ex.count}" + (f"  paths: {_paths_text(ex.paths, 5)}" if ex.paths else ""))
    click.echo(f"  nearest known-unsafe ({len(ans.nearest_unsafe)}):")
    for nb in ans.nearest_unsafe:
        click.echo(
            f"  unsafe   id {nb.id:>6}  sim {nb.similarity:.3f}  {nb.level:<7} "
            f"{'+'.join(nb.sources):<22} {_paths_text(nb.paths or [])}"
        )
    click.echo(f"  near-duplicates ({len(ans.near_duplicates)}):")
    _print_near_duplicates(ans.near_duplicates, dup_paths)
    click.echo(f"  pdq {ans.pdq.hash} quality {ans.pdq.quality}, {len(ans.pdq.matches)} match(es)")
    for m in ans.pdq.matches:
        what = f"list {m.list}" if m.source == "hash_list" else f"labelled id {m.id}"
        turned = f" ({m.transform})" if m.transform != "original" else ""
        click.echo(f"    pdq match: {what} distance {m.distance}{turned}")
    for name, classes in ans.probes.items():
        click.echo(f"  probe {name}: " + ", ".join(f"{c} {v:.3f}" for c, v in classes.items()))


def print_errors(rows: Sequence[FileError], total: int, by_kind: Mapping[str, int]) -> None:
    """`errors`: one line per failed file, after the count by kind."""
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
    click.echo(f"{total} file(s) in error" + (f" (in the store: {kinds})" if kinds else ""))
    for r in rows:
        click.echo(f"  {r.kind:<18} {r.path}: {r.reason}")
    if total > len(rows):
        click.echo(f"  ... {total - len(rows)} more (raise --limit)")


def print_cluster(d: ClusterDetail, representative_paths: Sequence[str]) -> None:
    """`clusters`: one cluster or group with its representative and member paths."""
    flag = "  FLAGGED" if d.flagged else ""
    score = f", mean {d.score_level or 'medium'} score {d.mean_score:.3f}" if d.mean_score is not None else ""
    click.echo(f"{d.kind} {d.id}: {d.size} images, {d.unsafe_count} known-unsafe{score}{flag}")
    click.echo(f"  representative id {d.representative_id}: {_paths_text(representative_paths)}")
    for m in d.members:
        sources = "+".join(m.sources)
        sim = f"sim {m.similarity:.3f}" if m.similarity is not None else ""
        click.echo(f"    id {m.id:>6}  {sim:<9}  {m.level:<7} {sources:<18} {_paths_text(m.paths or [])}")
    if (d.members_total or 0) > len(d.members):
        click.echo(f"    ... {(d.members_total or 0) - len(d.members)} more members (raise --members)")
