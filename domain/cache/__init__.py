"""The shared base-image cache: fetch (download, write, stage, publish; from peers in host
scope), references to cached bases, what is in the cache (inventory), eviction, pre-caching, and
the cache's ports (references, the peer registry)."""
