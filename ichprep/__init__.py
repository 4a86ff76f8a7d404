"""ichprep."""
