"""Per-token prices of LLM models and the exact cost of one call's usage.

Prices come from a user price file first, then from the genai-prices data of the pinned package,
where model names match as genai-prices matches them (aliases, dated snapshots, `provider/model`
prefixes). A model neither source knows has no price: its cost is unknown, never guessed. Money
is `Decimal` throughout.

A call's prompt tokens split three ways: read from a prompt cache (the cache-read rate), written
to one (the cache-write rate: 1.25x the input rate on Anthropic's 5-minute cache) and the rest
(the input rate). `Usage` has one cache-write count, billed at the 5-minute cache's rate.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import genai_prices
from genai_prices import data_snapshot
from genai_prices import types as gp
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from pyagent.errors import PyAgentError
from pyagent.types import Usage
from pyagent.yamlfile import config_error, line_of, load_yaml, validate

log = logging.getLogger(__name__)

MTOK = Decimal(1_000_000)
BATCH_CONTEXT = {"processing": "batch"}  # genai-prices' price variant for batch APIs
GENAI_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok",
              "cache_write_1h_mtok")  # in the order of `Rates`' fields
NO_CACHE_READ_PRICE = "no_cache_read_price"  # cached tokens billed at the input rate
NO_CACHE_WRITE_PRICE = "no_cache_write_price"  # cache writes billed at the input rate
USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens")
BATCH_DISCOUNT_UNKNOWN = "batch_discount_unknown"  # batch asked, none known: standard rates


class UsageError(PyAgentError):
    """Token counts that cannot be right: not integers, negative, or more cached than prompt."""


def check_usage(usage: Usage) -> None:
    """Raise UsageError unless `usage` holds non-negative integer counts and its cache reads and
    writes fit in its prompt."""
    for name in USAGE_COUNTS:
        value = getattr(usage, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{name} must be an integer >= 0, got {value!r}")
    if usage.cached_tokens + usage.cache_write_tokens > usage.prompt_tokens:
        raise UsageError(f"cached_tokens ({usage.cached_tokens}) and cache_write_tokens "
                         f"({usage.cache_write_tokens}) cannot exceed prompt_tokens "
                         f"({usage.prompt_tokens})")


def to_decimal(value: int | float | Decimal) -> Decimal:
    """`value` as a Decimal; a float by its shortest spelling (0.1 -> Decimal('0.1'))."""
    return value if isinstance(value, Decimal) else Decimal(repr(value))


def decimal_text(value: Decimal | None) -> str | None:
    """An optional Decimal for JSON: a string, so that it stays exact."""
    return None if value is None else str(value)


@dataclass(frozen=True)
class Rates:
    """USD per million tokens. A cache rate of None means the table lists none: cached tokens
    then cost the input rate (no cache discount)."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cache_read_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None  # 5-minute cache
    cache_write_1h_per_mtok: Decimal | None = None

    def scaled(self, factor: Decimal) -> Rates:
        """Every rate times `factor`."""
        return Rates(**{k: None if v is None else v * factor for k, v in asdict(self).items()})


@dataclass(frozen=True)
class Tier:
    """Rates for a whole call once its prompt exceeds `above_prompt_tokens`."""

    above_prompt_tokens: int
    rates: Rates


@dataclass(frozen=True)
class Schedule:
    """Base rates and the prompt-size tiers above them; as providers bill, the highest tier a
    prompt exceeds prices every token of the call."""

    base: Rates
    tiers: tuple[Tier, ...] = ()

    def rates_for(self, prompt_tokens: int) -> Rates:
        for tier in reversed(self.tiers):
            if prompt_tokens > tier.above_prompt_tokens:
                return tier.rates
        return self.base


@dataclass(frozen=True)
class Cost:
    """The USD cost of one call: uncached prompt tokens, cached prompt tokens, prompt tokens
    written to a cache, and output.

    `notes` flag where the table lacked a rate: `no_cache_read_price` (cached tokens billed at the
    input rate), `no_cache_write_price` (cache writes billed at the input rate),
    `batch_discount_unknown` (batch asked for, billed at standard rates)."""

    input: Decimal
    cached: Decimal
    output: Decimal
    batch: bool  # batch rates applied
    source: str
    notes: tuple[str, ...] = ()
    cache_write: Decimal = Decimal(0)

    @property
    def total(self) -> Decimal:
        return self.input + self.cached + self.cache_write + self.output

    def to_dict(self) -> dict[str, Any]:
        return {"input": str(self.input), "cached": str(self.cached),
                "cache_write": str(self.cache_write), "output": str(self.output),
                "total": str(self.total), "batch": self.batch, "source": self.source,
                "notes": list(self.notes)}


@dataclass(frozen=True)
class ModelPrice:
    """What one model costs: standard rates, batch rates where known, and where they come from."""

    model: str  # the name the source lists the price under
    provider: str | None
    standard: Schedule
    batch: Schedule | None  # None: no batch pricing known
    source: str

    @property
    def batch_discount(self) -> Decimal | None:
        """The fraction taken off the base input rate by batch pricing, where it is known."""
        if self.batch is None or not self.standard.base.input_per_mtok:
            return None
        return 1 - self.batch.base.input_per_mtok / self.standard.base.input_per_mtok

    def cost(self, usage: Usage, batch: bool = False) -> Cost:
        """The exact cost of `usage` at these prices (batch rates when `batch` and known)."""
        check_usage(usage)
        schedule = self.batch if batch and self.batch is not None else self.standard
        notes = [BATCH_DISCOUNT_UNKNOWN] if batch and self.batch is None else []
        rates = schedule.rates_for(usage.prompt_tokens)
        read_rate, write_rate = rates.cache_read_per_mtok, rates.cache_write_per_mtok
        for rate, count, note in ((read_rate, usage.cached_tokens, NO_CACHE_READ_PRICE),
                                  (write_rate, usage.cache_write_tokens, NO_CACHE_WRITE_PRICE)):
            if rate is None and count:
                notes.append(note)
        uncached = usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens
        return Cost(input=rates.input_per_mtok * uncached / MTOK,
                    cached=_or(read_rate, rates.input_per_mtok) * usage.cached_tokens / MTOK,
                    cache_write=_or(write_rate, rates.input_per_mtok) * usage.cache_write_tokens
                    / MTOK,
                    output=rates.output_per_mtok * usage.completion_tokens / MTOK,
                    batch=schedule is self.batch, source=self.source, notes=tuple(notes))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "provider": self.provider, "source": self.source,
                "standard": _schedule_dict(self.standard),
                "batch": None if self.batch is None else _schedule_dict(self.batch),
                "batch_discount": decimal_text(self.batch_discount)}


class PriceTable:
    """Model prices: the user price file's entries first, then genai-prices' data.

    A user entry with a provider serves lookups that name that provider (as an argument or as a
    `provider/` prefix) or none; one without serves every provider. With no user entry, a lookup
    with no provider lets a `provider/` prefix name it, as genai-prices reads LiteLLM names.
    """

    def __init__(self, user_file: str | Path | None = None):
        self.user_file = Path(user_file) if user_file is not None else None
        self._user = _load_user_prices(self.user_file) if self.user_file else {}
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str | None]] = set()

    def price(self, model: str, provider: str | None = None,
              at: datetime | None = None) -> ModelPrice | None:
        """The price of `model` at time `at` (default: now); None, logged once, when unknown."""
        found = self._user_price(model, provider) or _genai_price(
            model, provider, at or datetime.now(UTC))
        if found is None:
            with self._lock:
                first = (model, provider) not in self._warned
                self._warned.add((model, provider))
            if first:
                log.warning("no price known for model %r%s: its cost is reported as unknown",
                            model, f" of provider {provider!r}" if provider else "")
        return found

    def cost(self, usage: Usage, model: str, provider: str | None = None, batch: bool = False,
             at: datetime | None = None) -> Cost | None:
        """The exact cost of one call, or None when the model's price is unknown."""
        check_usage(usage)
        price = self.price(model, provider, at)
        return None if price is None else price.cost(usage, batch)

    def sources(self) -> list[dict[str, Any]]:
        """Where prices come from, in the order they are consulted."""
        user = [{"kind": "user file", "path": str(self.user_file)}] if self.user_file else []
        return [*user, {"kind": "genai-prices", "version": genai_prices.__version__,
                        "data": _genai_data(data_snapshot.get_snapshot())}]

    def _user_price(self, model: str, provider: str | None) -> ModelPrice | None:
        wanted = [(model.lower(), provider.lower() if provider else None)]
        if provider is None and "/" in model:
            prefix, name = model.lower().split("/", 1)
            wanted.insert(0, (name, prefix))
        for name, wanted_provider in wanted:
            entries = self._user.get(name, [])
            for entry in entries:
                if entry.provider is not None and entry.provider.lower() == wanted_provider:
                    return entry
            for entry in entries:
                if entry.provider is None or wanted_provider is None:
                    return entry
        return None


def _or(rate: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if rate is None else rate


def _number(value: Any) -> Decimal:
    """A YAML number as an exact Decimal; anything else is an error."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {value!r}")
    return to_decimal(value)


Number = Annotated[Decimal, BeforeValidator(_number), Field(allow_inf_nan=False)]
PerMtok = Annotated[Number, Field(ge=0)]


class UserPrice(BaseModel):
    """One entry of a user price file: USD per million tokens; `batch_discount` is the fraction
    taken off every rate for batch requests (0.5: half price)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    provider: str | None = Field(None, min_length=1)
    input_per_mtok: PerMtok
    output_per_mtok: PerMtok
    cache_read_per_mtok: PerMtok | None = None
    cache_write_per_mtok: PerMtok | None = None
    batch_discount: Annotated[Number, Field(ge=0, le=1)] | None = None


class PriceFile(BaseModel):
    """A user price file: `prices:` and a list of entries."""

    model_config = ConfigDict(extra="forbid")

    prices: list[UserPrice]


def _load_user_prices(path: Path) -> dict[str, list[ModelPrice]]:
    """The entries of a user price file by lower-case model name; errors name file and line."""
    data, lines = load_yaml(path)
    entries = validate(PriceFile, data, lines, path).prices
    by_model: dict[str, list[ModelPrice]] = {}
    seen: dict[tuple[str, str | None], int] = {}
    for index, entry in enumerate(entries):
        key = (entry.model.lower(), entry.provider.lower() if entry.provider else None)
        line = line_of(lines, ("prices", index))
        if key in seen:
            raise config_error(path, lines, ("prices", index),
                               f"prices.{index}: model {entry.model!r}"
                               f"{f' of provider {entry.provider!r}' if entry.provider else ''} "
                               f"is priced twice (first on line {seen[key]})")
        seen[key] = line or 0
        rates = Rates(entry.input_per_mtok, entry.output_per_mtok, entry.cache_read_per_mtok,
                      entry.cache_write_per_mtok)
        batch = None if entry.batch_discount is None else Schedule(
            rates.scaled(1 - entry.batch_discount))
        by_model.setdefault(key[0], []).append(ModelPrice(
            entry.model, entry.provider, Schedule(rates), batch, f"{path}:{line}"))
    return by_model


def _genai_price(model: str, provider: str | None, at: datetime) -> ModelPrice | None:
    snapshot = data_snapshot.get_snapshot()
    try:  # provider "litellm" lets a `provider/` prefix name the provider
        found, info = snapshot.find_provider_model(model, None, provider or "litellm", None)
    except LookupError:
        return None
    standard = _schedule(info.get_prices(at))
    if standard is None:
        return None
    batch = None
    # genai-prices applies a provider's price variants only to its own models, not fallbacks
    if any(info is own for own in found.models) and any(
            v.when == BATCH_CONTEXT and (v.constraint is None or v.constraint.active(at))
            for v in info.price_variants or ()):
        batch = _schedule(info.get_prices(at, BATCH_CONTEXT))
    source = f"genai-prices {genai_prices.__version__} ({_genai_data(snapshot)})"
    return ModelPrice(info.id, found.id, standard, batch, source)


def _genai_data(snapshot: data_snapshot.DataSnapshot) -> str:
    if snapshot.from_auto_update:
        return f"data fetched {snapshot.timestamp.isoformat(timespec='seconds')}"
    return "bundled data"


def _schedule(prices: gp.ModelPrice) -> Schedule | None:
    """genai-prices' token prices as a Schedule; None without both input and output rates."""
    values = [getattr(prices, key, None) for key in GENAI_KEYS]
    if values[0] is None or values[1] is None:
        return None
    starts = sorted({tier.start for value in values if isinstance(value, gp.TieredPrices)
                     for tier in value.tiers})
    return Schedule(Rates(*(_rate(value, None) for value in values)),
                    tuple(Tier(start, Rates(*(_rate(value, start) for value in values)))
                          for start in starts))


def _rate(value: Decimal | gp.TieredPrices | None, above: int | None) -> Decimal | None:
    """The rate of `value` for a prompt just above `above` tokens (None: the base rate)."""
    if not isinstance(value, gp.TieredPrices):
        return value
    rate = value.base
    for tier in value.tiers:  # ascending
        if above is not None and tier.start <= above:
            rate = tier.price
    return rate


def _schedule_dict(schedule: Schedule) -> dict[str, Any]:
    return {"base": _rates_dict(schedule.base),
            "tiers": [{"above_prompt_tokens": tier.above_prompt_tokens,
                       **_rates_dict(tier.rates)} for tier in schedule.tiers]}


def _rates_dict(rates: Rates) -> dict[str, str | None]:
    return {key: decimal_text(value) for key, value in asdict(rates).items()}
