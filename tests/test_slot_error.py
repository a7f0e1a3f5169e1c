"""The E2E slot error matcher on hand-made cases: each attribute said, omitted, contradicted, in both MR forms."""

from __future__ import annotations

import pytest

from ldlm.evaluation.slot_error import parse_mr, slot_error_rate, slot_errors

MR = ("name : The Eagle | Type : coffee shop | food : Chinese | price : less than £ 20 | customer rating : 5 out of 5 "
      "| area : city centre | family friendly : no | near : Burger King")


def test_both_mr_forms_parse_alike():
    official = ("name[The Eagle], eatType[coffee shop], food[Chinese], priceRange[less than £20], "
                "customerRating[5 out of 5], area[city centre], familyFriendly[no], near[Burger King]")
    assert parse_mr(MR).keys() == parse_mr(official).keys()
    assert parse_mr(MR)["near"] == "Burger King" and parse_mr(official)["price"] == "less than £20"
    with pytest.raises(ValueError, match="unknown E2E attribute 'stars'"):
        parse_mr("name : X | stars : 5")


def test_a_faithful_text_has_no_errors_whatever_its_wording():
    for text in ("The Eagle is a cheap Chinese coffee shop in the city centre near Burger King. It has a 5 out of 5 "
                 "customer rating and is not family-friendly.",
                 "Near Burger King in the centre of the city, The Eagle serves Chinese food for less than £20. This "
                 "highly rated coffee shop does not welcome children."):
        result = slot_errors(MR, text)
        assert (result.slots, result.omitted, result.contradicted) == (8, [], [])


@pytest.mark.parametrize("text, omitted, contradicted", [
    ("The Eagle is a coffee shop near Burger King.", ["food", "price", "rating", "area", "family"], []),
    ("The Eagle is an expensive Italian pub in the riverside area near Burger King, rated 1 out of 5, and "
     "kid friendly.", [], ["type", "food", "price", "rating", "area", "family"]),
    ("A cheap Chinese coffee shop in the city centre near Burger King, rated 5 out of 5, not for families.",
     ["name"], []),
])
def test_omissions_and_contradictions_are_told_apart(text, omitted, contradicted):
    result = slot_errors(MR, text)
    assert sorted(s.split("=")[0] for s in result.omitted) == sorted(omitted)
    assert sorted(s.split("=")[0] for s in result.contradicted) == sorted(contradicted)


def test_names_are_blanked_before_other_attributes():
    mr = "name : The Punter | Type : pub | food : English | near : Raja Indian Cuisine"
    result = slot_errors(mr, "The Punter is an English pub near Raja Indian Cuisine.")  # not Indian food
    assert result.errors == 0
    result = slot_errors("name : Blue Spice | Type : pub | near : Café Sicilia",
                         "Blue Spice is a pub by Café Sicilia.")
    assert result.errors == 0  # the near name's "Café" is not a coffee shop


def test_value_classes_and_negations():
    mr = "name : X | price : £ 20 - 25 | customer rating : average | family friendly : yes | area : riverside"
    assert slot_errors(mr, "X is moderately priced, averagely rated, kid friendly and by the river.").errors == 0
    assert slot_errors(mr, "X costs £20-25, has an average customer rating, welcomes families, outside the city "
                           "centre.").errors == 0
    no = "name : X | family friendly : no"
    assert slot_errors(no, "X is not family friendly.").errors == 0
    assert slot_errors(no, "X is family friendly.").contradicted == ["family=no"]


def test_the_rate_sums_errors_over_slots():
    assert slot_error_rate([MR, "name : X | area : riverside"],
                           ["The Eagle.", "X is by the river."]) == pytest.approx(7 / 10)
