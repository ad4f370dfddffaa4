"""Money as ``Decimal`` with an ISO 4217 currency, rounded to the currency's minor unit only
where a line's amount is fixed (ROUND_HALF_UP: 0.005 EUR is a cent, as on a till)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal

__all__ = [
    "CURRENCIES",
    "MAX_AMOUNT",
    "check_currency",
    "WIDE",
    "minor_unit",
    "round_amount",
]

# What an amount column holds (Numeric(14, 4)): a line or total from it on is refused.
MAX_AMOUNT = Decimal(10) ** 10
# Wide enough that no product of a count (up to 2**63) and a price loses a digit.
WIDE = Context(prec=60)

# The active ISO 4217 codes (2024), without funds and precious metals.
CURRENCIES = frozenset(
    """AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN
    BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP
    GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS
    KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR
    MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF
    SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD
    TZS UAH UGX USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG""".split()
)
# Minor units other than the usual two decimals.
_DECIMALS = {
    **dict.fromkeys("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF".split(), 0),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
}


def check_currency(code: str) -> str:
    """``code`` if it is an active ISO 4217 currency; ValueError otherwise."""
    if code not in CURRENCIES:
        raise ValueError(f"{code!r} is not an ISO 4217 currency code (e.g. EUR, USD)")
    return code


def minor_unit(currency: str) -> Decimal:
    """The smallest amount of ``currency``: 0.01 for EUR, 1 for JPY, 0.001 for KWD."""
    return Decimal(1).scaleb(-_DECIMALS.get(currency, 2))


def round_amount(value: Decimal, currency: str) -> Decimal:
    return value.quantize(minor_unit(currency), rounding=ROUND_HALF_UP, context=WIDE)
