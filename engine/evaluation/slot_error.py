"""The slot error rate of E2E restaurant descriptions: the share of a meaning representation's attribute values
that a text omits or contradicts (as the E2E challenge's semantic accuracy scripts measure it, by patterns).

An MR is `name : The Eagle | Type : coffee shop | food : Chinese | ...` (this corpus's form) or the official
`name[The Eagle], eatType[coffee shop], ...`. Names (name, near) must appear verbatim; the other attributes are
matched by patterns of their usual wordings ("kid friendly", "moderately priced", "by the river"). Values that
say the same thing are one class: a price "less than £20" is "cheap", a rating "5 out of 5" is "high". A slot
is omitted when no wording of its class appears, and contradicted when a wording of another class of the same
attribute does (a "Chinese" MR described as serving Italian food). Names are blanked before the other
attributes are matched, so "Raja Indian Cuisine" is not Indian food and "Café Sicilia" not a coffee shop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# attribute names as the two MR forms spell them -> one name
ATTRIBUTES = {"name": "name", "eatType": "type", "Type": "type", "food": "food", "priceRange": "price",
              "price": "price", "customer rating": "rating", "customerRating": "rating", "area": "area",
              "familyFriendly": "family", "family friendly": "family", "near": "near"}
VERBATIM = ("name", "near")

# attribute -> value (lower case, spaces folded) -> its class
CLASSES = {
    "price": {"cheap": "low", "less than £ 20": "low", "less than £20": "low", "moderate": "mid", "£ 20 - 25": "mid",
              "£20-25": "mid", "high": "high", "more than £ 30": "high", "more than £30": "high"},
    "rating": {"low": "low", "1 out of 5": "low", "average": "mid", "3 out of 5": "mid", "high": "high",
               "5 out of 5": "high"},
}

_POUND = r"(?:£|pounds?|euros?)"
# attribute -> [(class, wordings)], most specific first within an attribute (matches are blanked in order; a
# class may appear twice, around another's)
PATTERNS: dict[str, list[tuple[str, str]]] = {
    "family": [
        ("no", r"\b(?:not|non|isn'?t|is not|aren'?t|are not|no|doesn'?t|does not|don'?t|do not|un)[- ]?"
               r"(?:\w+[- ]){0,4}?(?:famil(?:y|ies)|kids?|child(?:ren)?)|adults?[- ]only|\badults?\b|"
               r"leav\w* the kids|without (?:the )?(?:kids|children)"),
        ("yes", r"famil(?:y|ies)|\bkids?\b|child(?:ren)?"),
    ],
    "price": [
        ("low", rf"cheap|inexpensive|low(?:[- ]cost|[- ]price|[- ]priced| prices?)|afford|budget|"
                rf"(?:less than|under|below) (?:{_POUND} ?)?(?:20|twenty)|price range is low"),
        ("mid", rf"moderat|average(?:[- ]priced| price)|mid[- ]?(?:range|priced|price|cost)|reasonabl|"
                rf"(?:{_POUND} ?)?20 ?(?:-|to) ?(?:{_POUND} ?)?25|twenty to twenty[- ]five"),
        ("high", rf"expensive|pricey|high[- ](?:end|price|priced|cost)|high prices?|upscale|premium|"
                 rf"(?:more than|over|above) (?:{_POUND} ?)?(?:30|thirty)|price range is high|prices? (?:are|is) high"),
    ],
    "rating": [
        ("low", r"\b(?:1|one) (?:out (?:of )?(?:5|five)|star)|low(?:ly)?[- ](?:rat|customer|score)|poor(?:ly)?[- ]rat|"
                r"rat\w* (?:is |of |as )?(?:low|poor)|badly rated"),
        ("mid", r"\b(?:3|three) (?:out (?:of )?(?:5|five)|stars?)|average[- ](?:customer|rat|score)|"
                r"rat\w* (?:is |of |as )?(?:average|okay|ok)|averagely rated"),
        ("high", r"\b(?:5|five) (?:out (?:of )?(?:5|five)|stars?)|high(?:ly)?[- ](?:rat|customer|score)|"
                 r"rat\w* (?:is |of |as )?(?:high|excellent|great)|excellent[- ](?:rat|customer)|well[- ]rated"),
    ],
    "area": [
        ("riverside", r"(?:outside|out of) (?:of )?(?:the )?city(?: cent(?:re|er))?"),  # before "city centre"
        ("city centre", r"cent(?:re|er)|downtown|\bcity\b"),
        ("riverside", r"river|waterfront"),
    ],
    "type": [
        ("coffee shop", r"coffee[- ]?(?:shop|chop|house)|\bcaf[eé]\b|\bcoffee\b"),
        ("pub", r"\bpubs?\b"),
        ("restaurant", r"\brestaurants?\b"),
    ],
    "food": [
        ("fast food", r"fast[- ]?food|burgers?|\bfries\b"),
        ("chinese", r"\bchinese\b"),
        ("english", r"\benglish\b|\bbritish\b"),
        ("french", r"\bfrench\b"),
        ("indian", r"\bindian\b|\bcurr(?:y|ies)\b"),
        ("italian", r"\bitalian\b|\bpasta\b|\bpizza\b"),
        ("japanese", r"\bjapanese\b|\bsushi\b"),
    ],
}


@dataclass
class SlotResult:
    """One text against one MR."""

    slots: int  # attribute values in the MR
    omitted: list[str] = field(default_factory=list)  # "attribute=value" the text does not say
    contradicted: list[str] = field(default_factory=list)  # ... or says otherwise

    @property
    def errors(self) -> int:
        return len(self.omitted) + len(self.contradicted)


def parse_mr(mr: str) -> dict[str, str]:
    """An MR in either form -> {attribute: value}, attributes as in ATTRIBUTES' values."""
    pairs = re.findall(r"([^,\[\]|]+)\[([^\]]*)\]", mr) if "[" in mr else \
        [tuple(part.split(" : ", 1)) for part in mr.split(" | ") if " : " in part]
    slots = {}
    for key, value in pairs:
        key = key.strip()
        if key not in ATTRIBUTES:
            raise ValueError(f"unknown E2E attribute {key!r} in MR {mr!r}; known: {sorted(ATTRIBUTES)}")
        slots[ATTRIBUTES[key]] = " ".join(value.split())
    return slots


def _class(attribute: str, value: str) -> str:
    value = value.lower()
    return CLASSES.get(attribute, {}).get(value, value)


def slot_errors(mr: str, text: str) -> SlotResult:
    slots = parse_mr(mr)
    result = SlotResult(len(slots))
    lowered = " ".join(text.lower().split())
    for attribute in VERBATIM:  # names first, then blanked so that their words match no other attribute
        if attribute in slots:
            name = slots[attribute].lower()
            if name not in lowered:
                result.omitted.append(f"{attribute}={slots[attribute]}")
            lowered = lowered.replace(name, " ")
    for attribute, patterns in PATTERNS.items():
        found, rest = set(), lowered
        for cls, pattern in patterns:  # most specific first: "not family friendly" is not "family friendly"
            if re.search(pattern, rest):
                found.add(cls)
                rest = re.sub(pattern, " ", rest)
        if attribute not in slots:
            continue
        expected = _class(attribute, slots[attribute])
        if found - {expected}:
            result.contradicted.append(f"{attribute}={slots[attribute]}")
        elif expected not in found:
            result.omitted.append(f"{attribute}={slots[attribute]}")
    return result


def slot_error_rate(mrs: list[str], texts: list[str]) -> float:
    """Errors over slots, summed over (MR, text) pairs."""
    results = [slot_errors(mr, text) for mr, text in zip(mrs, texts, strict=True)]
    return sum(r.errors for r in results) / max(1, sum(r.slots for r in results))
