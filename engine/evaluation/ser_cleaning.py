"""The slot error rate of E2E descriptions by the rules of the E2E cleaning project's matcher (Dušek, Howcroft and
Rieser 2019, "Semantic Noise Matters for Neural Natural Language Generation"; its `slot_error.py` in
tuetschek/e2e-cleaning), written anew here so that ldlm's figures can be set beside the published ones.

Stricter than ldlm.evaluation.slot_error in three ways:
- it counts *added* slots: an attribute (or a second value of one) that the text says and the MR does not, a
  venue name not in the MR included;
- each value has its own wordings, matched as whole words, case-insensitive: "family" alone says nothing of
  family friendliness, "river" alone is not "riverside", "city" alone is not the city centre;
- a price or rating keeps its MR value: "cheap" and "less than £20" are different values sharing some wordings.

The matching, as the script does it: every wording of every value of every attribute is found in the text; a
match that lies inside a longer one is dropped (the "Indian" of "Raja Indian Cuisine", the "café" of "Café
Sicilia"); of matches on the same words, the one whose value the MR holds is kept, else the first. Then, per
attribute: its MR value not found is *missing*, found values not in the MR are *added*, and a found value in
place of the MR's is a *value error* (one per MR value). A value said twice counts once (the script's count
does so in effect). SER = (added + missing + value errors) / the MR's slots.

One of the script's patterns never matches (a space missing before the noun in "friendly to the kids"); it is
left out, which changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache

from ldlm.evaluation.slot_error import parse_mr

# attribute (ldlm.evaluation.slot_error's names) -> value -> its wordings (regular expressions, whole words)
_FAMILY = r"(?:child|children|family|kids|kid)"
_YOUNG = r"(?:kids?|child(?:ren)?|famil(?:y|ies))"
_RATED = r"(?:rat(?:ings?|e[ds]?)|reviews?|standards?|quality)"
_RATED_AFTER = r"(?:rat(?:ings?|ed)|reviews?|standards?|quality)"
_LOW_PRICE = [r"(?:inexpensive|cheap)(?:ly)?", r"low[- ]+price[ds]?", r"affordabl[ey]",
              r"prices?(?: range)?(?: \w+){0,3} low"]
_HIGH_PRICE = [r"high[- ]+price[ds]?", r"expensive", r"prices?(?: range)?(?: \w+){0,3} high"]
_MID_PRICE = [r"(?:moderate|reasonable|ok|average)(?:ly)?[- ]+price[ds]?",
              r"prices?(?: range)?(?: \w+){0,3} (?:ok|average|moderate|reasonable)", r"affordable"]


def _stars(digit: str, word: str) -> list[str]:
    return [rf"(?:{digit}|{word})[- ]+stars?", rf"(?:{digit}|{word})(?: out)? of (?:5|five)"]


def _rated(quality: str, before: str) -> list[str]:
    """A rating said in words: "rated as high", or "highly rated" (`before` may stand up to two words ahead)."""
    return [rf"{_RATED}(?: \w+){{0,2}} (?:as )?{quality}", rf"{before}(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+{_RATED_AFTER}"]


WORDINGS: dict[str, dict[str, list[str]]] = {
    "area": {
        "city centre": [r"(?:city|town) cent(?:re|er)", r"cent(?:re|er) of (?:the )?(?:city|town)",
                        r"in the cent(?:re|er)"],
        "riverside": [r"riverside", r"(?:near|by|at|close to|along|on|off|beside) the river"],
    },
    "type": {"coffee shop": [r"coffee[- ]+shop", r"caf[eé]", r"coffee"], "pub": [r"pub"],
             "restaurant": [r"restaurant"]},
    "family": {
        "no": [
            rf"(?:isn't|not|non|no)[ -]+(?:\w+ ){{0,2}}{_FAMILY}[ -]+(?:friendly|orien(?:ta)?ted)",
            rf"{_FAMILY}[ -]+unfriendly", r"adults?[ -]+only", r"only for adults",
            r"(?:no|not) (?:kids|children|famil(?:y|ies))",
            r"(?:not|no)(?: good| suitable| friendly| orien(?:ta)?ted| open(?:ed))? (?:at|for|to|with)(?: the)? "
            r"(?:kids|children|family|families|all age)",
            rf"{_YOUNG} (?:are|is)(?:n't| not) (?:welcome|allowed|accepted)",
            rf"(?:does not|doesn't) (?:welcome|allow|accept) (?:\w+ ){{0,2}}(?:{_YOUNG}|all age)",
            r"adult (?:establishment|venue|place|establish)",
        ],
        "yes": [
            r"for (?:kids|children|family|families)", r"family place", r"place to bring the(?: whole)? family",
            rf"{_FAMILY}[ -]+(?:friendly|orien(?:ta)?ted)", rf"{_YOUNG} (?:are|is) (?:welcome|allowed|accepted)",
            rf"(?:welcomes?|allows?|accepts?) (?:\w+ ){{0,2}}(?:{_YOUNG}|all age)",
        ],
    },
    "food": {"chinese": [r"chinese", r"chines"], "english": [r"english", r"british"], "fast food": [r"fast food"],
             "french": [r"french"], "indian": [r"indian"], "italian": [r"italian"], "japanese": [r"japanese"]},
    "price": {
        "cheap": _LOW_PRICE,
        "less than £20": [*_LOW_PRICE, r"(?:less than|under) £? *20", r"moderately priced"],
        "more than £30": [r"(?:more than|over) £? *30", *_HIGH_PRICE, r"not cheap"],
        "high": _HIGH_PRICE,
        "moderate": [*_MID_PRICE, r"not cheap", r"mid[- ]+range[- ]+price[ds]?"],
        "£20-25": [r"£? *20 *(?:[-–]*|to) *25", *_MID_PRICE],
    },
    "rating": {
        "1 out of 5": _stars("1", "one") + _rated("(?:low|bad|poor)", "(?:low|bad|poor)"),
        "3 out of 5": _stars("3", "three") + _rated("average", "average"),
        "5 out of 5": _stars("5", "five") + _rated("high", "(?:high|excellent|very good|great)"),
        "high": _stars("5", "five") + _rated("high", "(?:high|excellent|very good|great|well)"),
        "average": _stars("3", "three") + _rated("average", "(?:average|(?<!very )(?:good|well))"),
        "low": _stars("1", "one") + _rated("(?:low|bad|poor)",
                                           "(?:low|bad|poor|does ?n['o]t have good|(?:is)?n['o]t (?:well|good))"),
    },
}
# the E2E data's venues: a name the text says is a name or near slot, the MR's or an added one
NAMES = ["Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto",
         "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
         "The Cambridge Blue", "The Cricketers", "The Dumpling Tree", "The Eagle", "The Golden Curry",
         "The Golden Palace", "The Mill", "The Olive Grove", "The Phoenix", "The Plough", "The Punter", "The Rice Boat",
         "The Twenty Two", "The Vaults", "The Waterman", "The Wrestlers", "Travellers Rest Beefeater", "Wildwood",
         "Zizzi"]
NEAR = ["All Bar One", "Avalon", "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge", "Café Sicilia",
        "Clare Hall", "Crowne Plaza Hotel", "Express by Holiday Inn", "Rainbow Vegetarian Café", "Raja Indian Cuisine",
        "Ranch", "The Bakers", "The Portland Arms", "The Rice Boat", "The Six Bells", "The Sorrento",
        "Yippee Noodle Bar"]


@dataclass
class CleaningResult:
    """One text against one MR, by the cleaning project's rules."""

    slots: int
    added: list[str] = field(default_factory=list)  # "attribute=value" said, not in the MR
    missing: list[str] = field(default_factory=list)  # in the MR, not said
    wrong: list[str] = field(default_factory=list)  # the MR's value said otherwise

    @property
    def errors(self) -> int:
        return len(self.added) + len(self.missing) + len(self.wrong)


@dataclass(frozen=True)
class _Match:
    attribute: str
    value: str
    start: int
    end: int

    def inside(self, other: _Match) -> bool:
        """Strictly inside `other`'s span (same span excluded)."""
        return other.start <= self.start and self.end <= other.end and (self.start, self.end) != (other.start,
                                                                                                      other.end)


@cache
def _patterns() -> list[tuple[str, str, re.Pattern]]:
    """(attribute, value, the value's wordings as one whole-word pattern), in the order matches are preferred."""
    table = {**WORDINGS, "name": {n.lower(): [re.escape(n)] for n in NAMES},
             "near": {n.lower(): [re.escape(n)] for n in NEAR}}
    order = ["area", "type", "family", "food", "name", "near", "price", "rating"]  # the script's slot order
    return [(attribute, value, re.compile("|".join(rf"\b{w}\b" for w in wordings), re.IGNORECASE))
            for attribute in order for value, wordings in table[attribute].items()]


def _canonical(attribute: str, value: str) -> str:
    """An MR value as WORDINGS keys it: lower case, "less than £ 20" -> "less than £20", "£ 20 - 25" -> "£20-25"."""
    value = " ".join(value.lower().split())
    if attribute in ("price", "rating"):
        value = re.sub(r"£ ", "£", re.sub(r" ?- ?", "-", value))
    return value


def cleaning_errors(mr: str, text: str) -> CleaningResult:
    """`text` against `mr` (either MR form; ldlm.evaluation.slot_error.parse_mr)."""
    gold = {attribute: _canonical(attribute, value) for attribute, value in parse_mr(mr).items()}
    matches = [_Match(attribute, value, m.start(), m.end()) for attribute, value, pattern in _patterns()
               for m in pattern.finditer(text)]
    kept: list[_Match] = []
    for match in matches:
        same = [o for o in matches if o is not match and (o.start, o.end) == (match.start, match.end)]
        if any(match.inside(o) for o in matches):
            continue
        if any(gold.get(o.attribute) == o.value or o in kept for o in same):
            continue
        kept.append(match)
    said: dict[str, set[str]] = {}
    for match in kept:
        said.setdefault(match.attribute, set()).add(match.value)
    result = CleaningResult(len(gold))
    for attribute in sorted(set(gold) | set(said)):
        values = said.get(attribute, set())
        if attribute not in gold:
            result.added += [f"{attribute}={v}" for v in sorted(values)]
        elif not values:
            result.missing.append(f"{attribute}={gold[attribute]}")
        elif gold[attribute] in values:
            result.added += [f"{attribute}={v}" for v in sorted(values - {gold[attribute]})]
        else:  # one value error for the MR's value; any further values are added
            others = sorted(values)
            result.wrong.append(f"{attribute}={gold[attribute]} (said {others[0]})")
            result.added += [f"{attribute}={v}" for v in others[1:]]
    return result


def cleaning_slot_error_rate(mrs: list[str], texts: list[str]) -> float:
    """(added + missing + value errors) over the MRs' slots, summed over (MR, text) pairs."""
    results = [cleaning_errors(mr, text) for mr, text in zip(mrs, texts, strict=True)]
    return sum(r.errors for r in results) / max(1, sum(r.slots for r in results))
