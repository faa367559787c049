"""A generated PII corpus for the redaction tests: valid values, rendered the ways callers say them.

``corpus(kind, rng, n)`` returns ``n`` samples: a carrier sentence around one planted value, with
the value's span.  Values are random but valid (SSA-valid SSNs, Luhn-valid cards with real
prefixes, real dates, NANP and international phones); each is rendered in one of several surface
forms (separators, none, number words, "oh" for zero, "double" for repeats, digits and words mixed).
Carrier sentences contain no digits and no number words, so whatever digits remain after redaction
came from the value.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.redaction import Kind

DIGIT_WORDS = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINALS = (
    "_ first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth"
    " fifteenth sixteenth seventeenth eighteenth nineteenth twentieth").split()
MONTHS = "_ january february march april may june july august september october november december".split()


@dataclass(frozen=True, slots=True)
class Sample:
    kind: Kind
    text: str
    start: int  # the planted value's span in text
    end: int
    form: str

    @property
    def value(self) -> str:
        return self.text[self.start:self.end]


# --- rendering helpers ---------------------------------------------------------------------------
def two_digit_words(n: int) -> str:
    if n < 10:
        return DIGIT_WORDS[n]
    if n < 20:
        return TEENS[n - 10]
    return TENS[n // 10] + ("" if n % 10 == 0 else " " + DIGIT_WORDS[n % 10])


def ordinal_words(n: int) -> str:
    if n <= 20:
        return ORDINALS[n]
    if n == 30:
        return "thirtieth"
    return TENS[n // 10] + " " + ORDINALS[n % 10]


def spoken_group(digits: str, rng: random.Random, zero: str, mixed: bool = False, doubles: bool = False) -> str:
    words: list[str] = []
    i = 0
    while i < len(digits):
        d = digits[i]
        if doubles and i + 1 < len(digits) and digits[i + 1] == d and rng.random() < 0.8:
            words.append("double " + (zero if d == "0" else DIGIT_WORDS[int(d)]))
            i += 2
            continue
        if mixed and rng.random() < 0.5:
            words.append(d)
        else:
            words.append(zero if d == "0" else DIGIT_WORDS[int(d)])
        i += 1
    return " ".join(words)


def spoken(groups: list[str], rng: random.Random, zero: str = "zero", mixed: bool = False,
           doubles: bool = False) -> str:
    sep = rng.choice([" ", ", "])
    return sep.join(spoken_group(g, rng, zero, mixed, doubles) for g in groups)


def digit_forms(groups: list[str], rng: random.Random) -> dict[str, str]:
    """Surface forms shared by every digit-string kind."""
    digits = "".join(groups)
    return {
        "spaces": " ".join(groups),
        "dashes": "-".join(groups),
        "dots": ".".join(groups),
        "plain": digits,
        "words": spoken(groups, rng),
        "words_oh": spoken(groups, rng, zero="oh"),
        "words_mixed": spoken(groups, rng, zero=rng.choice(["oh", "zero"]), mixed=True),
        "words_double": spoken(groups, rng, zero="oh", doubles=True),
        "digits_spaced": " ".join(digits),
    }


# --- values --------------------------------------------------------------------------------------
def luhn_complete(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


CARD_PREFIXES = [  # (prefix, length, grouping)
    ("4", 16, (4, 4, 4, 4)), ("4", 13, (4, 4, 5)), ("4", 19, (4, 4, 4, 4, 3)),
    ("51", 16, (4, 4, 4, 4)), ("55", 16, (4, 4, 4, 4)), ("2221", 16, (4, 4, 4, 4)), ("2720", 16, (4, 4, 4, 4)),
    ("34", 15, (4, 6, 5)), ("37", 15, (4, 6, 5)), ("6011", 16, (4, 4, 4, 4)), ("65", 16, (4, 4, 4, 4)),
    ("35", 16, (4, 4, 4, 4)), ("62", 17, (4, 4, 4, 5)), ("36", 14, (4, 6, 4)),
]


def split(digits: str, sizes: tuple[int, ...]) -> list[str]:
    out, pos = [], 0
    for s in sizes:
        out.append(digits[pos:pos + s])
        pos += s
    return out


def card_forms(rng: random.Random) -> dict[str, str]:
    prefix, length, grouping = rng.choice(CARD_PREFIXES)
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    return digit_forms(split(luhn_complete(body), grouping), rng)


def ssn_forms(rng: random.Random) -> dict[str, str]:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    digits = f"{area:03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}"
    forms = digit_forms(split(digits, (3, 2, 4)), rng)
    del forms["dots"]
    return forms


def phone_forms(rng: random.Random) -> dict[str, str]:
    area = rng.choice([555, rng.randint(200, 999)])
    exchange = rng.randint(200, 999) if rng.random() < 0.7 else rng.randint(100, 999)
    line = f"{rng.randint(0, 9999):04d}"
    groups = [str(area), str(exchange), line]
    forms = digit_forms(groups, rng)
    forms["words_pairs"] = spoken([str(area), str(exchange)], rng, zero="oh") + ", " + " ".join(
        two_digit_words(int(line[k:k + 2])) if line[k] != "0" else spoken_group(line[k:k + 2], rng, "oh")
        for k in (0, 2))
    forms["parens"] = f"({area}) {exchange}-{line}"
    forms["plus_one"] = f"+1 {area} {exchange} {line}"
    forms["one_dash"] = f"1-{area}-{exchange}-{line}"
    forms["area_code"] = "area code " + spoken([str(area)], rng, zero="oh") + rng.choice(
        [", ", " and then ", " then "]) + spoken([str(exchange), line], rng, zero="oh")
    country, intl = rng.choice([
        ("44", [f"20 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}"]),
        ("44", [f"7{rng.randint(100, 999)} {rng.randint(100000, 999999)}"]),
        ("33", ["1 " + " ".join(f"{rng.randint(10, 99)}" for _ in range(4))]),
        ("49", [f"30 {rng.randint(1000000, 9999999)}"]),
        ("61", [f"2 {rng.randint(1000, 9999)} {rng.randint(1000, 9999)}"]),
    ])
    forms["international"] = f"+{country} {intl[0]}"
    forms["international_words"] = "plus " + spoken([country] + intl[0].split(), rng, zero="oh")
    return forms


def dob_forms(rng: random.Random) -> dict[str, str]:
    year, month, day = rng.randint(1930, 2006), rng.randint(1, 12), rng.randint(1, 28)
    month_name = MONTHS[month]
    if year >= 2000:
        spoken_year = "two thousand" + ("" if year == 2000 else rng.choice([" ", " and "]) + two_digit_words(
            year - 2000))
    else:
        yy = year % 100
        spoken_year = "nineteen " + ("oh " + DIGIT_WORDS[yy] if yy < 10 else two_digit_words(yy))
    suffix = "th" if 10 <= day <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return {
        "mm/dd/yyyy": f"{month:02d}/{day:02d}/{year}",
        "m/d/yyyy": f"{month}/{day}/{year}",
        "m-d-yy": f"{month}-{day}-{year % 100:02d}",
        "iso": f"{year}-{month:02d}-{day:02d}",
        "dots": f"{month:02d}.{day:02d}.{year}",
        "month d yyyy": f"{month_name} {day} {year}",
        "month dth, yyyy": f"{month_name} {day}{suffix}, {year}",
        "abbrev": f"{month_name[:3].capitalize()} {day} {year}",
        "spoken": f"{month_name} {ordinal_words(day)} {spoken_year}",
        "spoken_the_of": f"the {ordinal_words(day)} of {month_name} {spoken_year}",
        "d month yyyy": f"{day} {month_name} {year}",
        "month the dth": f"{month_name} the {ordinal_words(day)}, {year}",
        "spoken_numeric": " ".join([
            "oh " + DIGIT_WORDS[month] if month < 10 else two_digit_words(month),
            two_digit_words(day) if day >= 10 else "oh " + DIGIT_WORDS[day],
            two_digit_words(year % 100) if year % 100 >= 10 else "oh " + DIGIT_WORDS[year % 100]]),
    }


FIRST = "john maria david sarah james linda robert karen michael susan kevin nancy jose emily daniel laura".split()
LAST = "smith johnson garcia brown lee martinez davis lopez wilson anderson taylor thomas moore jackson harris".split()
DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "example.co.uk", "hotmail.com", "aol.com", "icloud.com",
           "acme-corp.org", "mail.net", "uni.edu", "company.io", "provider.ca"]


def email_forms(rng: random.Random) -> dict[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    number = f"{rng.randint(1, 99)}" if rng.random() < 0.4 else ""
    shape = rng.choice(["dot", "initial", "underscore", "dash", "joined"])
    local = {"dot": f"{first}.{last}", "initial": f"{first[0]}{last}", "underscore": f"{first}_{last}",
             "dash": f"{first}-{last}", "joined": f"{first}{last}"}[shape] + number
    domain = rng.choice(DOMAINS)
    said_local = {"dot": f"{first} dot {last}", "initial": f"{first[0]} {last}",
                  "underscore": f"{first} underscore {last}", "dash": f"{first} dash {last}",
                  "joined": f"{first} {last}"}[shape]
    if number:
        said_local += " " + spoken_group(number, rng, "oh")
    said_domain = domain.replace(".", " dot ")
    return {
        "written": f"{local}@{domain}",
        "written_caps": f"{local.capitalize()}@{domain.upper()}",
        "spoken": f"{said_local} at {said_domain}",
        "spoken_written_domain": f"{said_local} at {domain}",
    }


# --- carriers ------------------------------------------------------------------------------------
CARRIERS: dict[Kind, list[str]] = {
    Kind.CARD: ["my card number is {x} thanks", "{x}.", "is it {x}?", "{x}", "it's {x} okay", "the card is {x}",
                "visa {x}", "charge it to {x} please", "sure, it's {x}", "the long number on the front is {x}",
                "my account number is {x}", "yeah {x} and that's the card"],
    Kind.SSN: ["{x}", "it's {x}.", "it's {x} okay", "sure it's {x}", "yeah {x} thanks", "uh {x}",
               "okay so {x}, got that?"],
    Kind.PHONE: ["call me at {x}", "it's {x}.", "did you get {x}?", "my number is {x}", "{x}", "it's {x} okay",
                 "you can reach me on {x} thanks", "my cell is {x}", "the best number is {x}", "phone {x}",
                 "try {x} in the evening", "text me at {x} please"],
    Kind.DOB: ["my date of birth is {x}", "i was born {x}.", "dob {x}", "d o b is {x}", "i was born on {x}",
               "born {x}", "my birthday is {x}", "{x} is my date of birth", "birth date {x} okay", "DOB: {x}",
               "date of birth, {x}", "uh my date of birth would be {x} yes"],
    Kind.EMAIL: ["my email is {x}", "it's {x}.", "{x}", "send it to {x} please", "it's {x}",
                 "you can reach me at {x}", "email address {x} okay", "sure, {x}", "the e-mail is {x} thanks",
                 "write to {x}"],
}
SSN_CONTEXT_CARRIERS = ["my ssn is {x}", "social security number {x}", "my social is {x} okay", "s s n {x}",
                        "{x} is my social", "SSN: {x}", "the social is {x} right"]
NEEDS_CONTEXT = {(Kind.SSN, "plain")}  # an unbroken 9-digit run is only an SSN when context says so

FORMS: dict[Kind, Callable[[random.Random], dict[str, str]]] = {
    Kind.CARD: card_forms, Kind.SSN: ssn_forms, Kind.PHONE: phone_forms, Kind.DOB: dob_forms,
    Kind.EMAIL: email_forms,
}


def corpus(kind: Kind, rng: random.Random, n: int) -> list[Sample]:
    """``n`` sentences, each with one planted value of ``kind``; forms rotate so each is well represented."""
    samples: list[Sample] = []
    for i in range(n):
        forms = FORMS[kind](rng)
        names = sorted(forms)
        form = names[i % len(names)]
        carriers = CARRIERS[kind]
        if kind == Kind.SSN and ((kind, form) in NEEDS_CONTEXT or rng.random() < 0.5):
            carriers = SSN_CONTEXT_CARRIERS
        pre, post = rng.choice(carriers).split("{x}")
        value = forms[form]
        if value.startswith("area code "):  # the cue is not part of the number
            pre, value = pre + "area code ", value.removeprefix("area code ")
        samples.append(Sample(kind, pre + value + post, len(pre), len(pre) + len(value), form))
    return samples
