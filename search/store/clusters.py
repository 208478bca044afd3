"""The cluster tables' SQL (clusterings, clusters, cluster_members): a part of `Store`."""

from __future__ import annotations


class ClusterTables:
    """Mixin of `Store`: every SQL statement on the cluster tables lives here."""
