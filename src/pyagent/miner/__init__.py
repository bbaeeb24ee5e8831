"""The expert miner: failed traces become specialist agents, promoted only on held-out evidence."""
