"""URL slugs from titles."""

import re


def slugify(title: str, max_length: int = 60) -> str:
    """The title as a URL slug: lowercase words joined by hyphens."""
    words = re.findall(r"[A-Za-z0-9]+", title)
    slug = "-".join(words)
    return slug[:max_length].rstrip("-")


def unique_slug(title: str, taken: set[str]) -> str:
    """A slug for `title` that is not in `taken`, numbered if it must be."""
    slug = slugify(title)
    candidate, n = slug, 2
    while candidate in taken:
        candidate, n = f"{slug}-{n}", n + 1
    return candidate
