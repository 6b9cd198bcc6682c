"""Personal data in free text, found in Python where a regular expression alone cannot decide.

`core.anonymize.scrub_sql` replaces the common, unambiguous shapes (ASCII e-mail addresses,
international phone numbers, IP addresses, ...) with DuckDB regexes over the whole batch; a text
that still holds something that may be personal data (six digits or more, a digit of another
script, a full-width or invisible character, an `@`, an `(at)`; anonymize.RESIDUAL_PATTERN) comes
here, through a function registered on the connection (`anonymize.register_scrubber`). Any text
can be given to scrub_text: it finds everything on its own. It finds, in this order:

- URLs with credentials, e-mail addresses (Unicode local parts and domains, IDN) and obfuscated
  ones (`jane(at)example(dot)com`, `jane at example dot com`, ...);
- IBANs (mod-97 checksum; an IBAN-shaped account of the right length whose checksum fails is
  still an account), national ids (US SSN, UK NI number, Spanish DNI/NIE, Italian codice fiscale,
  French NIR, Brazilian CPF, Indian Aadhaar, Canadian SIN; each by its check digits where it has
  them), card numbers (Luhn, separators ` `, `-`, `_`, `.`), IP addresses (UUIDs, dates, year
  ranges and times are set aside first, so that none is taken for a number);
- phone numbers: international `+`/`00` forms, trunk-prefixed national numbers, North American
  shapes, and numbers that Google's libphonenumber (`phonenumbers`) judges valid in one of
  PHONE_REGIONS.

Detection runs on a normalized copy of the text (NFKC, every Unicode decimal digit mapped to its
ASCII digit, dashes to `-`, spaces to ` `, invisible format characters dropped), so full-width
digits or a zero-width space inside an address change nothing; the replacement covers the
original characters. No function here raises on any input: a failure replaces the whole text.
"""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from collections.abc import Callable
from typing import NamedTuple

import phonenumbers
import pyarrow as pa

EMAIL = "[email]"
PHONE = "[phone]"
CARD = "[card-or-account]"
IBAN = "[iban]"
NATIONAL_ID = "[national-id]"
IP = "[ip]"
URL = "[url-with-credentials]"
USER = "[user]"
KEEP = ""  # the placeholder of a span that is left as it is (but hidden from later detectors)
# What a text becomes when scrubbing it failed: nothing of it is kept rather than risk a leak.
UNSCRUBBABLE = "[redacted]"

PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "NL", "ES", "IT")
MAX_PHONE_GROUPS = 8  # groups of digits in one phone number, at most ("+33 1 23 45 67 89" has 6)
MAX_PHONE_RUN = 48  # longer runs of digits and separators are searched by shape only
MAX_TEXT = 1 << 20  # longer texts are redacted whole (free text is capped far below this)


class Span(NamedTuple):
    start: int
    end: int
    placeholder: str


# --------------------------------------------------------------------------- normalization

_FOLDED: dict[str, str] = {}
# ASCII control characters that detection drops (tab and line breaks are white space to it).
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_MARK = "\u01c0"  # a letter (Lo) that stands in for a combining mark


def _fold(ch: str) -> str:
    """The detection form of one non-ASCII character."""
    folded = _FOLDED.get(ch)
    if folded is None:
        category = unicodedata.category(ch)
        # zero-width space and joiners, soft hyphen, bidi marks; control characters (a NUL or a
        # unit separator between the digits of a card number hid it, and a NUL is _MASK too)
        if category in ("Cf", "Cc"):
            folded = ""
        elif category == "Nd":
            folded = str(unicodedata.decimal(ch))
        elif category in ("Zs", "Zl", "Zp"):
            folded = " "
        elif category == "Pd":
            folded = "-"
        elif ch in "\u00b7\u2027\u30fb\u2219":  # middle dots: separators, as a dot is
            folded = "."
        elif category in ("Mn", "Mc", "Me"):
            # A combining mark belongs to the word it is in; Python's \w does not take marks.
            folded = _MARK
        else:
            folded = "".join(
                str(unicodedata.decimal(c)) if unicodedata.category(c) == "Nd" else c
                for c in unicodedata.normalize("NFKC", ch)
            )
        if len(_FOLDED) < 65536:
            _FOLDED[ch] = folded
    return folded


def normalize(text: str) -> tuple[str, list[int] | None, list[int] | None]:
    """(detection text, original start and end of each of its characters); None for both when
    every character maps to itself or to one character in place."""
    if text.isascii() and not _ASCII_CONTROL.search(text):
        return text, None, None
    parts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    shifted = False
    for i, ch in enumerate(text):
        folded = ch if " " <= ch < "\x7f" or ch in "\t\n\r" else _fold(ch)
        parts.append(folded)
        if len(folded) != 1:
            shifted = True
        for _ in folded:
            starts.append(i)
            ends.append(i + 1)
    norm = "".join(parts)
    return (norm, starts, ends) if shifted else (norm, None, None)


# --------------------------------------------------------------------------- check digits


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: the country code and check digits moved to the end, letters as 10..35, mod 97 = 1."""
    moved = iban[4:] + iban[:4]
    try:
        return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1
    except ValueError:
        return False


_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def verhoeff_ok(digits: str) -> bool:
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[i % 8][ord(ch) - 48]]
    return check == 0


def cpf_ok(digits: str) -> bool:
    if len(digits) != 11 or len(set(digits)) == 1:
        return False
    numbers = [ord(c) - 48 for c in digits]
    for n in (9, 10):
        total = sum(numbers[i] * (n + 1 - i) for i in range(n))
        if (total * 10 % 11) % 10 != numbers[n]:
            return False
    return True


def dni_letter(number: int) -> str:
    return "TRWAGMYFPDXBNJZSQVHLCKE"[number % 23]


# IBAN lengths per country (SWIFT IBAN registry), French overseas territories included.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23,
    "PK": 24, "PL": 28, "PS": 29, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
    **{code: 27 for code in ("GF", "GP", "MQ", "RE", "PF", "TF", "YT", "NC", "PM", "WF", "BL", "MF")},
}


# --------------------------------------------------------------------------- detectors
# Every pattern starts behind a boundary (a look-behind), so a long run of the same characters is
# scanned once, not once per position: hostile input stays linear.

_URL_WITH_CREDENTIALS = re.compile(r"(?<![\w])[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@]+@[^\s]*")

_LOCAL_CH = r"[\w.%+'!#$&*=?^{|}~/\-\u0300-\u036f]"
_LABEL = r"[\w\-\u0300-\u036f]+"
_TLD = r"(?:xn--[A-Za-z0-9\-]+|[^\W\d_]{2,63})"
# The at sign as people and web forms write it: plain, URL-encoded, as an HTML entity.
_AT_SIGN = r"(?:@|%40|&#0*64;|&#[xX]0*40;|&commat;)"
_EMAIL = re.compile(
    rf"(?:(?<!{_LOCAL_CH}){_LOCAL_CH}+|\"[^\"\n]{{1,64}}\"){_AT_SIGN}"
    rf"(?:(?:{_LABEL}\.)+{_TLD}|\[\[ip\]\]|\[[0-9A-Fa-f.:]+\])"
)

_AT = r"(?P<at>\s*[(\[{<]\s*(?:at|@)\s*[)\]}>]\s*|\s+at\s+|\s*@\s+|\s+@\s*)"
_DOT = r"(?:\s*[(\[{<]\s*(?:dot|\.)\s*[)\]}>]\s*|\s+dot\s+|\s+\.\s+|\.)"
_PART = r"[\w%+\-\u0300-\u036f]+"
_OBFUSCATED_EMAIL = re.compile(
    rf"(?<![\w.%+\-])(?P<local>(?>{_PART}(?:{_DOT}{_PART})*)){_AT}"
    rf"(?P<domain>{_PART}(?:{_DOT}{_PART})*{_DOT}[^\W\d_]{{2,24}})(?![\w])",
    re.IGNORECASE,
)
_OBFUSCATION_HINT = re.compile(r"(?i)\bat\b|\bdot\b|\s@|@\s|[(\[{<]\s*[@.]\s*[)\]}>]")
# "look at example.com" is a sentence, not an address: with a plain " at " and plain dots, these
# words before it are not taken for a mailbox name.
_NOT_A_MAILBOX = frozenset(
    "look looking looked me us him her them it this that site website page is was are were be been "
    "available posted hosted find found see seen up out here there visit check on arrived stay "
    "stayed meet met work works worked live lives lived based located now and or".split()
)

_IBAN_START = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]{2}) ?([0-9]{2})(?=[ \-]?[A-Za-z0-9])")

_SSN = re.compile(
    r"(?<![\w\-])(?!000|666|9[0-9]{2})[0-9]{3}(?P<sep>[ .\-]?)(?!00)[0-9]{2}(?P=sep)(?!0000)[0-9]{4}(?![\w\-])"
)
_UK_NINO = re.compile(
    r"(?<![\w])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r" ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D](?![\w])",
    re.IGNORECASE,
)
_ES_DNI = re.compile(r"(?<![\w])(?P<n>[0-9]{8})[ \-]?(?P<l>[A-Za-z])(?![\w])")
_ES_NIE = re.compile(r"(?<![\w])(?P<x>[XYZxyz])[ \-]?(?P<n>[0-9]{7})[ \-]?(?P<l>[A-Za-z])(?![\w])")
_IT_CODICE_FISCALE = re.compile(
    r"(?<![\w])[A-Za-z]{6}[0-9]{2}[A-EHLMPR-Ta-ehlmpr-t][0-9]{2}[A-Za-z][0-9]{3}[A-Za-z](?![\w])"
)
_FR_NIR = re.compile(
    r"(?<![\w])(?P<body>[12] ?[0-9]{2} ?(?:0[1-9]|1[0-2]|[2-9][0-9]) ?(?:[0-9]{2}|2[ABab]) ?[0-9]{3} ?[0-9]{3})"
    r" ?(?P<key>[0-9]{2})(?![\w])"
)
_BR_CPF = re.compile(r"(?<![\w.\-])[0-9]{3}\.?[0-9]{3}\.?[0-9]{3}-?[0-9]{2}(?![\w])")
_IN_AADHAAR = re.compile(r"(?<![\w])[2-9][0-9]{3}[ \-]?[0-9]{4}[ \-]?[0-9]{4}(?![\w])")
_CA_SIN = re.compile(r"(?<![\w])[1-79][0-9]{2}[ \-][0-9]{3}[ \-][0-9]{3}(?![\w])")

_CARD = re.compile(r"(?<![\w.\-])[0-9](?:[ \-_./*]?[0-9]){12,18}(?![0-9])")

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|0?[0-9]?[0-9])"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![0-9]|\.[0-9])")
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")

_DATE = re.compile(
    r"(?<![0-9])(?:"
    r"[0-9]{4}[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12][0-9]|3[01])"
    r"|(?:0?[1-9]|[12][0-9]|3[01])[-/.](?:0?[1-9]|1[0-2])[-/.](?:[0-9]{4}|[0-9]{2})"
    r"|(?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12][0-9]|3[01])[-/.](?:[0-9]{4}|[0-9]{2})"
    r")(?![0-9]|[-/.][0-9])"
)
_YEAR_RANGE = re.compile(r"(?<![0-9])(?:1[89]|20)[0-9]{2} ?[-/] ?(?:1[89]|20)[0-9]{2}(?![0-9])")
_TIME = re.compile(r"(?<![\w:])[0-9]{1,2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?(?![0-9A-Fa-f:])")
_UUID = re.compile(
    r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}(?![0-9A-Fa-f])"
)
_PHONE_CANDIDATE = re.compile(r"(?<![\w+])(?:\+ ?)?\(?[0-9][0-9 ()./\-]*[0-9]\)?")
_NANP = re.compile(r"(?:\+?1[ .\-]?)?(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .\-/]?)[0-9]{3}[ .\-][0-9]{4}")
_LOCAL_SEVEN = re.compile(r"[2-9][0-9]{2}[ .\-][0-9]{4}")
_DIGIT_GROUP = re.compile(r"\(?[0-9]+\)?")

_MASK = "\x00"


def _email(work: str) -> list[Span]:
    if "@" not in work and "%40" not in work and "&#" not in work and "&commat;" not in work:
        return []
    return [Span(m.start(), m.end(), EMAIL) for m in _EMAIL.finditer(work)]


def _obfuscated_email(work: str) -> list[Span]:
    if not _OBFUSCATION_HINT.search(work):
        return []
    found = []
    for m in _OBFUSCATED_EMAIL.finditer(work):
        plain = m.group("at").strip().lower() in ("at", "@") and "dot" not in m.group("domain").lower()
        if plain and (m.group("local").lower() in _NOT_A_MAILBOX or " " in m.group("local")):
            continue
        found.append(Span(m.start(), m.end(), EMAIL))
    return found


def _iban(work: str) -> list[Span]:
    found = []
    for m in _IBAN_START.finditer(work):
        country = m.group(1).upper()
        length = IBAN_LENGTHS.get(country)
        if length is None:
            continue
        chars = [country, m.group(2)]
        have, i, end = 4, m.end(), len(work)
        while have < length and i < end:
            ch = work[i]
            if ch.isascii() and ch.isalnum():
                chars.append(ch.upper())
                have += 1
                i += 1
            elif ch in " -" and i + 1 < end and work[i + 1].isascii() and work[i + 1].isalnum():
                i += 1
            else:
                break
        if have != length or (i < end and work[i].isascii() and work[i].isalnum()):
            continue
        iban = "".join(chars)
        if iban_ok(iban):
            found.append(Span(m.start(), i, IBAN))
        elif sum(ch.isdigit() for ch in iban[4:]) >= 10:
            # The shape of an account number of this country, with a typo in it: still an account.
            found.append(Span(m.start(), i, CARD))
    return found


def _digits(text: str) -> str:
    return "".join(ch for ch in text if "0" <= ch <= "9")


def _national_id(work: str) -> list[Span]:
    found = []
    for m in _SSN.finditer(work):
        found.append(Span(m.start(), m.end(), NATIONAL_ID))
    for m in _UK_NINO.finditer(work):
        found.append(Span(m.start(), m.end(), NATIONAL_ID))
    for m in _ES_DNI.finditer(work):
        if dni_letter(int(m.group("n"))) == m.group("l").upper():
            found.append(Span(m.start(), m.end(), NATIONAL_ID))
    for m in _ES_NIE.finditer(work):
        number = int(str("XYZ".index(m.group("x").upper())) + m.group("n"))
        if dni_letter(number) == m.group("l").upper():
            found.append(Span(m.start(), m.end(), NATIONAL_ID))
    for m in _IT_CODICE_FISCALE.finditer(work):
        found.append(Span(m.start(), m.end(), NATIONAL_ID))
    for m in _FR_NIR.finditer(work):
        body = m.group("body").replace(" ", "").upper().replace("2A", "19").replace("2B", "18")
        if 97 - int(body) % 97 == int(m.group("key")):
            found.append(Span(m.start(), m.end(), NATIONAL_ID))
    for m in _BR_CPF.finditer(work):
        if cpf_ok(_digits(m.group())):
            found.append(Span(m.start(), m.end(), NATIONAL_ID))
    for m in _IN_AADHAAR.finditer(work):
        if verhoeff_ok(_digits(m.group())):
            found.append(Span(m.start(), m.end(), NATIONAL_ID))
    for m in _CA_SIN.finditer(work):
        if luhn_ok(_digits(m.group())):
            found.append(Span(m.start(), m.end(), NATIONAL_ID))
    return found


def _card(work: str) -> list[Span]:
    """Card numbers: 13 to 19 digits that pass Luhn, from an issuer range (first digit 2-6), bare
    or in groups of three digits or more (or spelled out digit by digit); a longer run may end in
    more digits after the number."""
    found = []
    for m in _CARD.finditer(work):
        text = m.group()
        groups = [(g.start(), g.end()) for g in re.finditer(r"[0-9]+", text)]
        sizes = {end - start for start, end in groups}
        if len(groups) > 1 and min(sizes) < 3 and sizes != {1}:
            continue
        if text[0] not in "23456":
            continue
        digits, ends = "", []
        for start, end in groups:
            digits += text[start:end]
            ends.append((len(digits), end))
        for length, end in reversed(ends if len(groups) > 1 else ends[-1:]):
            if 13 <= length <= 19 and luhn_ok(digits[:length]):
                found.append(Span(m.start(), m.start() + end, CARD))
                break
    return found


def _ip(work: str) -> list[Span]:
    found = [Span(m.start(), m.end(), IP) for m in _IPV4.finditer(work)]
    if "::" in work or work.count(":") >= 7:
        for m in _IPV6.finditer(work):
            text = m.group()
            if sum(1 for group in text.split(":") if group) < 2:
                continue
            try:
                ipaddress.IPv6Address(text)
            except ValueError:
                continue
            found.append(Span(m.start(), m.end(), IP))
    return found


def _valid_somewhere(candidate: str) -> bool:
    for region in PHONE_REGIONS:
        try:
            if phonenumbers.is_valid_number(phonenumbers.parse(candidate, region)):
                return True
        except phonenumbers.NumberParseException:
            continue
    return False


def _is_phone(candidate: str, weak: bool = True) -> bool:
    """Whether a run of digits and separators is one phone number: by its shape (international,
    trunk-prefixed national, North American) or, with `weak`, by libphonenumber's validity in
    one of PHONE_REGIONS."""
    digits = _digits(candidate)
    n = len(digits)
    if n < 7 or n > 17:
        return False
    if candidate.startswith("+") or (digits.startswith("00") and digits[2] != "0"):
        number = "+" + (digits if candidate.startswith("+") else digits[2:])
        if not 8 <= len(number) - 1 <= 15:
            return False
        try:
            return phonenumbers.is_possible_number(phonenumbers.parse(number, None))
        except phonenumbers.NumberParseException:
            return False
    if _NANP.fullmatch(candidate) or _LOCAL_SEVEN.fullmatch(candidate):
        return True
    if digits[0] == "0" and digits[1] != "0" and 9 <= n <= 12:
        return True  # a national number with its trunk prefix, as written in most of the world
    if not weak:
        return False
    separated = candidate != digits
    if separated and 8 <= n <= 13:
        return _valid_somewhere(candidate)
    if not separated and n in (10, 11):
        try:
            return phonenumbers.is_valid_number(phonenumbers.parse(digits, "US"))
        except phonenumbers.NumberParseException:
            return False
    return False


def _phones_in_run(candidate: str, start: int) -> list[Span]:
    """Phone numbers by shape among the groups of digits of one run, longest first from the left
    (a number has at most MAX_PHONE_GROUPS groups, so a long hostile run costs linear time)."""
    groups = [(g.start(), g.end(), len(_digits(g.group()))) for g in _DIGIT_GROUP.finditer(candidate)]
    found, i = [], 0
    while i < len(groups):
        last = min(i + MAX_PHONE_GROUPS, len(groups)) - 1
        counts = [0] * (last - i + 1)
        total = 0
        for k in range(i, last + 1):
            total += groups[k][2]
            counts[k - i] = total
        for j in range(last, i - 1, -1):
            if 7 <= counts[j - i] <= 17 and _is_phone(candidate[groups[i][0]:groups[j][1]], weak=False):
                found.append(Span(start + groups[i][0], start + groups[j][1], PHONE))
                i = j
                break
        i += 1
    return found


def _uuid(work: str) -> list[Span]:
    """UUIDs are kept, and hidden from the detectors after this one (the last group of one is no
    Aadhaar number)."""
    if "-" not in work:
        return []
    return [Span(m.start(), m.end(), KEEP) for m in _UUID.finditer(work)]


def _dates(work: str) -> list[Span]:
    """Dates, year ranges and times are kept, and hidden from the phone detector after this one."""
    if not any("0" <= ch <= "9" for ch in work):
        return []
    return [Span(m.start(), m.end(), KEEP) for pattern in (_DATE, _YEAR_RANGE, _TIME) for m in pattern.finditer(work)]


# A North American number grouped 3,3,4 with commas (no spaces): thousands separators group by
# threes, so no amount has this shape.
_NANP_COMMAS = re.compile(r"(?<![0-9,.])[2-9][0-9]{2},[0-9]{3},[0-9]{4}(?![0-9]|,[0-9])")


def _phone(masked: str) -> list[Span]:
    found = [Span(m.start(), m.end(), PHONE) for m in _NANP_COMMAS.finditer(masked)]
    for m in _PHONE_CANDIDATE.finditer(masked):
        if m.end() < len(masked) and (masked[m.end()].isalnum() or masked[m.end()] == "_"):
            continue
        candidate, start = m.group(), m.start()
        if candidate.startswith("(") and ")" not in candidate:
            candidate, start = candidate[1:], start + 1
        if candidate.endswith(")") and "(" not in candidate:
            candidate = candidate[:-1]
        if _is_phone(candidate, weak=False):
            found.append(Span(start, start + len(candidate), PHONE))
            continue
        # A run that holds more than one number ("77 555-123-4567", "030 1234567 / 040 7654321"):
        # the parts that have a phone number's shape, else the whole run if libphonenumber takes
        # it, else what libphonenumber finds in it.
        parts = _phones_in_run(candidate, start)
        if parts:
            found.extend(_merged(parts))
        elif len(candidate) > MAX_PHONE_RUN:
            continue
        elif _is_phone(candidate):
            found.append(Span(start, start + len(candidate), PHONE))
        elif len(_digits(candidate)) > 12:
            for region in PHONE_REGIONS:
                for match in phonenumbers.PhoneNumberMatcher(candidate, region, phonenumbers.Leniency.VALID):
                    found.append(Span(start + match.start, start + match.end, PHONE))
    return found


def _url(work: str) -> list[Span]:
    if "://" not in work:
        return []
    return [Span(m.start(), m.end(), URL) for m in _URL_WITH_CREDENTIALS.finditer(work)]


# The order is the priority: what an earlier detector takes is blanked for the later ones.
DETECTORS: tuple[tuple[str, Callable[[str], list[Span]]], ...] = (
    ("url", _url),
    ("email", _email),
    ("obfuscated_email", _obfuscated_email),
    ("iban", _iban),
    ("uuid", _uuid),
    ("national_id", _national_id),
    ("card", _card),
    ("ip", _ip),
    ("dates", _dates),
    ("phone", _phone),
)


def find_pii(text: str) -> list[Span]:
    """Spans of `text` (original positions) holding personal data, with their placeholders."""
    norm, starts, ends = normalize(text)
    work = norm
    spans: list[Span] = []
    for _, detect in DETECTORS:
        found = detect(work)
        if not found:
            continue
        found.sort()
        for span in found:
            spans.append(span)
        chars = list(work)
        for start, end, _ in found:
            chars[start:end] = _MASK * (end - start)
        work = "".join(chars)
    spans = [span for span in spans if span.placeholder != KEEP]
    if not spans:
        return []
    if starts is not None and ends is not None:
        spans = [Span(starts[s], ends[e - 1], p) for s, e, p in spans if e > s]
    return _merged(spans)


def _merged(spans: list[Span]) -> list[Span]:
    merged: list[Span] = []
    for span in sorted(spans):
        if merged and span.start < merged[-1].end:
            last = merged[-1]
            merged[-1] = Span(last.start, max(last.end, span.end), last.placeholder)
        else:
            merged.append(span)
    return merged


def _replace(text: str, spans: list[Span]) -> str:
    out, at = [], 0
    for start, end, placeholder in spans:
        out.append(text[at:start])
        out.append(placeholder)
        at = end
    out.append(text[at:])
    return "".join(out)


def _author(text: str, author: str | None) -> str:
    if not author:
        return text
    return re.sub(re.escape(author), USER, text, flags=re.IGNORECASE)


def scrub_text(text: str, author: str | None = None) -> str:
    """`text` with every piece of personal data found replaced by its placeholder, then the
    author's own id (any case) by [user]."""
    try:
        if len(text) > MAX_TEXT:
            return UNSCRUBBABLE
        spans = find_pii(text)
        return _author(_replace(text, spans) if spans else text, author)
    except Exception:  # noqa: BLE001 - a bug must cost the text, never leak it
        return UNSCRUBBABLE


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def scrub_json_text(text: str, author: str | None = None) -> str:
    """A JSON document with every string in it (keys too) scrubbed like free text; numbers,
    booleans, nulls, structure and unchanged strings are kept byte for byte. Keys hold no
    personal data in any sane producer and so stay as they are; a key that does is scrubbed too
    (two keys that become equal are told apart by a ` #2`, ` #3` suffix). Text that is not JSON
    is scrubbed as free text."""
    try:
        if len(text) > MAX_TEXT:
            return UNSCRUBBABLE
        json.loads(text)  # text that is not JSON is scrubbed as free text (below)
        keys_changed = False

        def scrubbed(m: re.Match) -> str:
            nonlocal keys_changed
            token = m.group()
            value = json.loads(token)
            new = scrub_text(value, author)
            if new == value:
                return token
            if text[m.end():m.end() + 64].lstrip().startswith(":"):
                keys_changed = True
            return json.dumps(new, ensure_ascii=False)

        out = _JSON_STRING.sub(scrubbed, text)
        if keys_changed:
            json.loads(out, object_pairs_hook=_unique_keys)
        return out
    except _DuplicateKey:
        return _rebuilt_json(text, author)
    except (ValueError, RecursionError):
        return scrub_text(text, author)
    except Exception:  # noqa: BLE001
        return UNSCRUBBABLE


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    if len({key for key, _ in pairs}) != len(pairs):
        raise _DuplicateKey
    return dict(pairs)


def _rebuilt_json(text: str, author: str | None) -> str:
    def scrub_value(value: object) -> object:
        if isinstance(value, str):
            return scrub_text(value, author)
        if isinstance(value, list):
            return [scrub_value(v) for v in value]
        return value

    def hook(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            new, n = scrub_text(key, author), 1
            candidate = new
            while candidate in out:
                n += 1
                candidate = f"{new} #{n}"
            out[candidate] = scrub_value(value)
        return out

    return json.dumps(json.loads(text, object_pairs_hook=hook), ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- as DuckDB functions
# Arrow functions: DuckDB hands over a whole vector of the rows that need them at once.


def scrub_text_batch(texts: pa.Array) -> pa.Array:
    return pa.array([None if t is None else scrub_text(t) for t in texts.to_pylist()], pa.string())


def scrub_json_batch(texts: pa.Array, authors: pa.Array) -> pa.Array:
    return pa.array(
        [
            None if t is None else scrub_json_text(t, a or None)
            for t, a in zip(texts.to_pylist(), authors.to_pylist(), strict=True)
        ],
        pa.string(),
    )
