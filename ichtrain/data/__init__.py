"""From a store to batches: tables and targets, folds, the epoch plan and balance, the shard stream, its loader."""
