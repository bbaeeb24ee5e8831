import pytest

from inventory.stock import add, remove, total_value


def test_add_counts_up():
    assert add({"apple": 2}, "apple", 3) == {"apple": 5}


def test_remove_counts_down():
    assert remove({"apple": 5}, "apple", 2) == {"apple": 3}


def test_remove_refuses_more_than_in_stock():
    with pytest.raises(ValueError):
        remove({"apple": 1}, "apple", 2)


def test_total_value():
    assert total_value({"apple": 2, "pear": 1}, {"apple": 0.5, "pear": 2.0}) == 3.0
