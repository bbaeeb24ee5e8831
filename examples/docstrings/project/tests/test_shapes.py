import math

from geometry.shapes import circle_area, perimeter, rectangle_area


def test_rectangle_area():
    assert rectangle_area(2, 3) == 6


def test_circle_area():
    assert circle_area(1) == math.pi


def test_perimeter():
    assert perimeter([1, 2, 3]) == 6
