"""The store and everything read from it: SQLite, FAISS indexes, known-unsafe, queries, clusters. No torch here."""
