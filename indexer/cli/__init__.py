"""The `nsfw-index` command line: translates flags to Settings and errors to exit codes; logic lives elsewhere."""

# One module per kind of verb (`analysis`: score, query; `store`: index, rebuild, stats, export; `review`: label,
# import-hashes, cluster; `serve`), the shared options in `options`, the text printers in `output`. Each verb opens
# the store once and hands it to the engine.

from __future__ import annotations

import click

from indexer.cli.analysis import query, score
from indexer.cli.forget import forget
from indexer.cli.hashlists import hash_lists
from indexer.cli.inspect import clusters, errors, neighbours, show
from indexer.cli.probes import probes, train_probe
from indexer.cli.review import cluster, import_hashes, label
from indexer.cli.serve import serve
from indexer.cli.store import export, index, rebuild, stats
from indexer.cli.verify import verify

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="nsfw-index")
def cli() -> None:
    """NSFW scores, nearest known-unsafe images, near-duplicates and clusters for an image corpus.

    \b
    Example:
      nsfw-index index ~/corpus --store ./store
      nsfw-index query upload.jpg --store ./store --json
    """


for _command in (show, neighbours, errors, clusters):  # review from the terminal
    cli.add_command(_command)
for _command in (train_probe, probes):  # issue 14: custom classifiers on the stored embeddings
    cli.add_command(_command)
for _command in (score, index, query, label, import_hashes, cluster, stats, export, rebuild, verify, serve):
    cli.add_command(_command)
cli.add_command(hash_lists)  # issue 14: hash lists as banks
cli.add_command(forget)  # issue 14: remove one image (its label events stay)


def main() -> None:
    cli(prog_name="nsfw-index")
