"""Task-agnostic data plumbing: samplers and loaders every task can reuse."""
