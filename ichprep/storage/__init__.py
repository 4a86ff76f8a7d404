"""The store: its layout and shards, where it lies, its lock, manifest, format upgrades and exports."""
