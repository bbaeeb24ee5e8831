"""A tiny inventory: stock levels and the total value of what is on the shelves."""
