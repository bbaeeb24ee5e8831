"""Durable run state: checkpoint stores behind one `CheckpointStore` protocol."""
