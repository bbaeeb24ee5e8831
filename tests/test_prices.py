"""Model prices from genai-prices' real data and from user price files; exact costs."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import genai_prices
import pytest

from pyagent.bench.prices import (
    BATCH_DISCOUNT_UNKNOWN,
    NO_CACHE_READ_PRICE,
    NO_CACHE_WRITE_PRICE,
    PriceTable,
    UsageError,
)
from pyagent.errors import ConfigError
from pyagent.types import Usage

WHEN = datetime(2026, 11, 1, tzinfo=UTC)  # after the bundled batch rates start (2026-10-14)
BEFORE_BATCH = datetime(2026, 9, 1, tzinfo=UTC)
EXAMPLE = Path(__file__).parents[1] / "examples" / "prices.yaml"


def reference(usage: Usage, model: str, provider: str | None = None, batch: bool = False,
              at: datetime = WHEN) -> genai_prices.types.PriceCalculation:
    """genai-prices' own calculation of the same call."""
    return genai_prices.calc_price(
        genai_prices.Usage(input_tokens=usage.prompt_tokens, cache_read_tokens=usage.cached_tokens,
                           cache_write_tokens=usage.cache_write_tokens,
                           output_tokens=usage.completion_tokens),
        model, provider_id=provider, genai_request_timestamp=at,
        price_context={"processing": "batch"} if batch else None)


@pytest.mark.parametrize("model", ["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro",
                                   "gemini-2.5-flash", "claude-2"])
@pytest.mark.parametrize("usage", [Usage(10_000, 500, 8_000), Usage(1_234_567, 89, 0),
                                   Usage(250_000, 3_000, 200_000), Usage(200_000, 1, 7),
                                   Usage(10_000, 500, 4_000, 3_000)])
@pytest.mark.parametrize("batch", [False, True])
def test_costs_match_genai_prices_own_calculation(model: str, usage: Usage, batch: bool) -> None:
    cost = PriceTable().cost(usage, model, batch=batch, at=WHEN)
    expected = reference(usage, model, batch=batch)
    assert cost is not None
    assert cost.total == expected.total_price
    assert cost.input + cost.cached + cost.cache_write == expected.input_price
    assert cost.output == expected.output_price


def test_worked_example_in_exact_decimals() -> None:
    table = PriceTable()
    usage = Usage(prompt_tokens=10_000, completion_tokens=500, cached_tokens=8_000)
    gpt = table.cost(usage, "gpt-4o", at=WHEN)
    assert gpt is not None
    # 2,000 uncached at $2.50, 8,000 cached at $1.25, 500 out at $10 per million
    assert (gpt.input, gpt.cached, gpt.output) == (Decimal("0.005"), Decimal("0.01"),
                                                   Decimal("0.005"))
    assert gpt.total == Decimal("0.02") and gpt.notes == () and not gpt.batch
    claude = table.cost(usage, "claude-sonnet-4-5", at=WHEN)
    assert claude is not None
    # $3 in, $0.30 cached read, $15 out
    assert (claude.input, claude.cached, claude.output) == (Decimal("0.006"), Decimal("0.0024"),
                                                            Decimal("0.0075"))
    batch = table.cost(usage, "claude-sonnet-4-5", batch=True, at=WHEN)
    assert batch is not None and batch.batch and batch.total == claude.total / 2


def test_prices_carry_cache_writes_tiers_batch_and_source() -> None:
    price = PriceTable().price("claude-sonnet-4-5", at=WHEN)
    assert price is not None
    assert (price.model, price.provider) == ("claude-sonnet-4-5", "anthropic")
    base = price.standard.base
    assert (base.input_per_mtok, base.output_per_mtok, base.cache_read_per_mtok,
            base.cache_write_per_mtok, base.cache_write_1h_per_mtok) == tuple(
        Decimal(x) for x in ("3", "15", "0.3", "3.75", "6"))
    [tier] = price.standard.tiers
    assert tier.above_prompt_tokens == 200_000 and tier.rates.input_per_mtok == Decimal("6")
    assert price.standard.rates_for(200_000) is base
    assert price.standard.rates_for(200_001) is tier.rates
    assert price.batch_discount == Decimal("0.5")
    assert price.batch is not None and price.batch.base.cache_read_per_mtok == Decimal("0.15")
    assert price.source == f"genai-prices {genai_prices.__version__} (bundled data)"
    assert price.to_dict()["standard"]["tiers"][0]["above_prompt_tokens"] == 200_000


@pytest.mark.parametrize(("ref", "provider", "model", "matched_provider"), [
    ("gpt-4o-2024-08-06", None, "gpt-4o", "openai"),
    ("openai/gpt-4o", None, "gpt-4o", "openai"),
    ("anthropic/claude-sonnet-4.5", None, "claude-sonnet-4-5", "anthropic"),
    ("claude-sonnet-4-5-20250929", None, "claude-sonnet-4-5", "anthropic"),
    ("claude-sonnet-4-5", "google", "claude-sonnet-4-5", "google"),
    ("GPT-4o", "openai", "gpt-4o", "openai"),
])
def test_model_names_match_as_genai_prices_matches_them(
        ref: str, provider: str | None, model: str, matched_provider: str) -> None:
    price = PriceTable().price(ref, provider, at=WHEN)
    assert price is not None
    assert (price.model, price.provider) == (model, matched_provider)


def test_unknown_models_have_no_price_and_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    table = PriceTable()
    with caplog.at_level(logging.WARNING, logger="pyagent.bench.prices"):
        assert table.price("gemma-3-270m") is None
        assert table.cost(Usage(10, 5), "gemma-3-270m") is None
        assert table.price("no-such-model", "openai") is None
        assert table.price("gpt-4o", "no-such-provider") is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    assert "'gemma-3-270m'" in warnings[0] and "unknown" in warnings[0]


def test_batch_without_batch_rates_is_flagged_not_invented() -> None:
    table = PriceTable()
    usage = Usage(10_000, 500, 8_000)
    old = table.price("gpt-4o", at=BEFORE_BATCH)
    assert old is not None and old.batch is None and old.batch_discount is None
    cost = table.cost(usage, "gpt-4o", batch=True, at=BEFORE_BATCH)
    assert cost is not None and not cost.batch and cost.notes == (BATCH_DISCOUNT_UNKNOWN,)
    assert cost.total == table.cost(usage, "gpt-4o", at=BEFORE_BATCH).total  # type: ignore[union-attr]
    # a provider serving another's model gets no batch rates, as in genai-prices
    assert table.price("gpt-4o", "azure", at=WHEN).batch is None  # type: ignore[union-attr]


def test_cached_tokens_cost_the_input_rate_only_without_a_cache_price() -> None:
    usage = Usage(10_000, 500, 8_000)
    cost = PriceTable().cost(usage, "claude-2", at=WHEN)
    assert cost is not None and cost.notes == (NO_CACHE_READ_PRICE,)
    assert cost.cached == Decimal(8) * 8_000 / 1_000_000
    assert cost.total == reference(usage, "claude-2").total_price
    no_cache = PriceTable().cost(Usage(10_000, 500), "claude-2", at=WHEN)
    assert no_cache is not None and no_cache.notes == ()


def test_cache_writes_cost_the_cache_write_rate() -> None:
    usage = Usage(10_000, 500, 4_000, 3_000)
    claude = PriceTable().cost(usage, "claude-sonnet-4-5", at=WHEN)
    assert claude is not None and claude.notes == ()
    # 3,000 uncached at $3, 4,000 read at $0.30, 3,000 written at $3.75 per million
    assert (claude.input, claude.cached, claude.cache_write) == (
        Decimal("0.009"), Decimal("0.0012"), Decimal("0.01125"))
    assert claude.to_dict()["cache_write"] == "0.01125"
    gpt = PriceTable().cost(usage, "gpt-4o", at=WHEN)  # OpenAI charges no cache-write fee
    assert gpt is not None and gpt.notes == (NO_CACHE_WRITE_PRICE,)
    assert gpt.cache_write == Decimal("2.5") * 3_000 / 1_000_000


def test_a_price_files_cache_write_rate_is_used(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("prices:\n  - model: m\n    input_per_mtok: 1\n    output_per_mtok: 2\n"
                    "    cache_read_per_mtok: 0.1\n    cache_write_per_mtok: 1.25\n")
    cost = PriceTable(path).cost(Usage(1_000_000, 0, 200_000, 400_000), "m")
    assert cost is not None and cost.notes == ()
    assert (cost.input, cost.cached, cost.cache_write) == (Decimal("0.4"), Decimal("0.02"),
                                                           Decimal("0.5"))


@pytest.mark.parametrize(("usage", "message"), [
    (Usage(-1, 5), "prompt_tokens must be an integer >= 0"),
    (Usage(10, -5), "completion_tokens must be an integer >= 0"),
    (Usage(10, 5, 11), r"cached_tokens \(11\) and cache_write_tokens \(0\) cannot exceed "
                       r"prompt_tokens \(10\)"),
    (Usage(10, 5, 6, 5), r"cache_write_tokens \(5\) cannot exceed prompt_tokens \(10\)"),
    (Usage(10, 5, 0, -1), "cache_write_tokens must be an integer >= 0"),
    (Usage(10.0, 5), "prompt_tokens must be an integer"),  # type: ignore[arg-type]
    (Usage(10, True), "completion_tokens must be an integer"),  # type: ignore[arg-type]
])
def test_impossible_usage_is_refused(usage: Usage, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        PriceTable().cost(usage, "gpt-4o")


def test_user_prices_come_first_and_are_exact() -> None:
    table = PriceTable(EXAMPLE)
    gemma = table.price("gemma-3-270m")
    assert gemma is not None and gemma.source == f"{EXAMPLE}:8"
    assert table.cost(Usage(10_000, 500, 8_000), "gemma-3-270m").total == 0  # type: ignore[union-attr]

    acme = table.price("acme-coder-32b", "acme")
    assert acme is not None and acme.batch_discount == Decimal("0.5")
    assert table.price("acme/acme-coder-32b") == acme
    assert table.price("acme-coder-32b") == acme  # no provider named: the entry serves
    assert table.price("acme-coder-32b", "other") is None
    cost = table.cost(Usage(1_000_000, 1_000_000, 300_000), "acme-coder-32b", "acme", batch=True)
    assert cost is not None and cost.batch
    assert (cost.input, cost.cached, cost.output) == (Decimal("0.14"), Decimal("0.006"),
                                                      Decimal("0.8"))
    assert table.price("gpt-4o", at=WHEN).source.startswith("genai-prices")  # type: ignore[union-attr]
    assert [s["kind"] for s in table.sources()] == ["user file", "genai-prices"]


def test_a_user_entry_overrides_genai_prices_for_its_provider_only(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("prices:\n"
                    "  - model: gpt-4o\n    provider: azure\n"
                    "    input_per_mtok: 0.1\n    output_per_mtok: 0.3\n")
    table = PriceTable(path)
    azure = table.cost(Usage(10, 10), "gpt-4o", "azure")
    assert azure is not None and azure.total == Decimal("0.000004")
    assert azure.source == f"{path}:2"
    openai = table.price("gpt-4o", "openai", at=WHEN)
    assert openai is not None and openai.standard.base.input_per_mtok == Decimal("2.5")


@pytest.mark.parametrize(("body", "where", "message"), [
    ("prices:\n  - model: m\n    input_per_mtok: -1\n    output_per_mtok: 2\n", 3,
     "prices.0.input_per_mtok: Input should be greater than or equal to 0"),
    ("prices:\n  - model: m\n    input_per_mtok: 1\n    output_per_mtok: lots\n", 4,
     "prices.0.output_per_mtok: Value error, must be a number, got 'lots'"),
    ("prices:\n  - model: m\n    input_per_mtok: '1.5'\n    output_per_mtok: 2\n", 3,
     "must be a number, got '1.5'"),
    ("prices:\n  - model: m\n    input_per_mtok: .nan\n    output_per_mtok: 2\n", 3,
     "finite number"),
    ("prices:\n  - model: m\n    input_per_mtok: 1\n    output_per_mtok: 2\n"
     "    batch_discount: 1.5\n", 5, "less than or equal to 1"),
    ("prices:\n  - model: m\n    input_per_mtok: 1\n", 2, "output_per_mtok: Field required"),
    ("prices:\n  - model: m\n    input_per_mtok: 1\n    output_per_mtok: 2\n    color: red\n",
     5, "Extra inputs are not permitted"),
    ("prices:\n  - model: m\n    input_per_mtok: 1\n    output_per_mtok: 2\n"
     "  - model: M\n    input_per_mtok: 3\n    output_per_mtok: 4\n", 5,
     "model 'M' is priced twice (first on line 2)"),
    ("prices:\n  - model: [unclosed\n", 2, "not valid YAML"),
])
def test_a_bad_price_file_names_file_and_line(tmp_path: Path, body: str, where: int,
                                              message: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        PriceTable(path)
    assert str(caught.value).startswith(f"{path}:{where}: ")
    assert message in str(caught.value)


def test_an_empty_or_missing_price_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        PriceTable(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        PriceTable(tmp_path / "missing.yaml")
