"""The HTTP adapter: schemas, routes, auth, limits and the inference queue over `indexer` and `search`."""
