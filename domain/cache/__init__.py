"""The shared base-image cache: fetch (download, write, inspect, publish), references to cached
bases, what is in the cache (inventory) and eviction."""
