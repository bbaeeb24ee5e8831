"""Tools that fleet agents call, each confined to a workspace; see `registry` for the names."""
