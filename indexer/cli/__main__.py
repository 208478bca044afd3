"""`python -m indexer.cli`: the same as the `nsfw-index` console script."""

from indexer.cli import main

main()
