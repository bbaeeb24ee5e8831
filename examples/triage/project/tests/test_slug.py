from textutil.slug import slugify, unique_slug


def test_slug_joins_words_with_hyphens():
    assert slugify("caches and queues") == "caches-and-queues"


def test_slug_lowercases():
    assert slugify("Paged KV Cache") == "paged-kv-cache"


def test_unique_slug_numbers_duplicates():
    assert unique_slug("a b", {"a-b"}) == "a-b-2"
