"""ichtrain."""
