"""The fuzzer: attacks on PyAgent's own fleet, judged from the state they leave, and defenses."""
