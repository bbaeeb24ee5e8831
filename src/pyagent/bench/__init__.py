"""The benchmark lab: suites that measure PyAgent against its anchors, with statistics."""
