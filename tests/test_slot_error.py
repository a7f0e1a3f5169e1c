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


# --- the E2E cleaning project's rules (ldlm.evaluation.ser_cleaning) -------------------------------------------

def test_cleaning_rules_count_added_slots_and_names_the_mr_lacks():
    from ldlm.evaluation.ser_cleaning import cleaning_errors

    mr = "name : Alimentum | area : riverside | family friendly : yes"
    assert cleaning_errors(mr, "Alimentum is a family friendly place by the river.").errors == 0
    result = cleaning_errors(mr, "Alimentum is a kid friendly riverside pub near Café Sicilia.")
    assert result.added == ["near=café sicilia", "type=pub"] and not result.missing and not result.wrong
    assert slot_errors(mr, "Alimentum is a kid friendly riverside pub near Café Sicilia.").errors == 0  # lenient


def test_cleaning_rules_need_a_values_own_wording():
    from ldlm.evaluation.ser_cleaning import cleaning_errors

    mr = "name : Alimentum | area : riverside | family friendly : yes"
    text = "Alimentum has a river view and is good for the family."  # "river", "family" alone say neither slot
    assert cleaning_errors(mr, text).missing == ["area=riverside", "family=yes"]
    assert slot_errors(mr, text).errors == 0
    no = "name : X | family friendly : no"
    assert cleaning_errors("name : Zizzi | family friendly : no", "Zizzi is not family-friendly.").errors == 0
    assert slot_errors(no, "X is not family friendly.").errors == 0


def test_cleaning_rules_keep_price_and_rating_values_apart_and_prefer_the_mrs_reading():
    from ldlm.evaluation.ser_cleaning import cleaning_errors

    cheap = "name : Cotto | price : cheap | customer rating : 5 out of 5"
    under20 = "name : Cotto | price : less than £ 20 | customer rating : high"
    text = "Cotto is cheap and highly rated."  # "cheap" reads as both cheap and less than £20: the MR's kept
    assert cleaning_errors(cheap, text).errors == 0 and cleaning_errors(under20, text).errors == 0
    result = cleaning_errors(cheap, "Cotto costs less than £20 and has a 5 out of 5 rating.")
    assert result.wrong == ["price=cheap (said less than £20)"] and not result.added
    result = cleaning_errors("name : Cotto | price : £ 20 - 25", "Cotto is expensive, £20-25.")
    assert result.added == ["price=more than £30"] and not result.wrong  # "expensive": one reading, the first


def test_cleaning_rules_drop_words_inside_a_longer_match():
    from ldlm.evaluation.ser_cleaning import cleaning_errors, cleaning_slot_error_rate

    mr = "name : The Punter | Type : pub | near : Raja Indian Cuisine"
    assert cleaning_errors(mr, "The Punter is a pub near Raja Indian Cuisine.").errors == 0  # not Indian food
    result = cleaning_errors(mr, "The Punter is an Indian pub.")
    assert result.added == ["food=indian"] and result.missing == ["near=raja indian cuisine"]
    assert cleaning_slot_error_rate([mr, mr], ["The Punter is a pub near Raja Indian Cuisine.",
                                               "The Punter is an Indian pub."]) == pytest.approx(2 / 6)
