"""Images to records: model loading, hooks, safe decoding, corpus walking, the indexing pipeline and the CLI."""
