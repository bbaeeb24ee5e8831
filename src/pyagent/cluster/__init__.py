"""Fleets on a Ray cluster: runs as actors, an engine per node, checkpoints on the buddy ring,
and a supervisor that resumes the runs of a node that died on the nodes that live."""
