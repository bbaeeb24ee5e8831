import math


def rectangle_area(width: float, height: float) -> float:
    return width * height


def circle_area(radius: float) -> float:
    return math.pi * radius**2


def perimeter(sides: list[float]) -> float:
    return sum(sides)
