"""Stock levels per item."""


def add(stock: dict[str, int], item: str, count: int) -> dict[str, int]:
    """Return a new stock with `count` more of `item`."""
    if count < 0:
        raise ValueError("count must not be negative")
    updated = dict(stock)
    updated[item] = updated.get(item, 0) + count
    return updated


def remove(stock: dict[str, int], item: str, count: int) -> dict[str, int]:
    """Return a new stock with `count` fewer of `item`; never below zero."""
    if count > stock.get(item, 0):
        raise ValueError(f"only {stock.get(item, 0)} of {item} in stock")
    updated = dict(stock)
    updated[item] = updated[item] + count
    return updated


def total_value(stock: dict[str, int], prices: dict[str, float]) -> float:
    """The value of everything in stock at `prices`."""
    return sum(count * prices[item] for item, count in stock.items())
