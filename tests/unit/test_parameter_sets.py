"""ParameterSets: equal parameter dicts are held once, whatever order the kinds of a login ask in."""

from proxy.parameters import ParameterSets


def test_equal_dicts_asked_for_in_turn_are_the_same_shared_dict() -> None:
    sets = ParameterSets()
    first = [sets.shared({"TimeZone": "UTC", "application_name": "app"}), sets.shared({"application_name": "app"}),
             sets.shared({})]
    for _ in range(3):  # the next logins ask for the same kinds in the same turn
        again = [sets.shared({"TimeZone": "UTC", "application_name": "app"}),
                 sets.shared({"application_name": "app"}), sets.shared({})]
        assert all(kept is held for kept, held in zip(again, first))


def test_a_dict_asked_for_after_many_others_is_still_the_shared_one() -> None:
    sets = ParameterSets()
    kept = sets.shared({"application_name": "app"})
    for n in range(10):  # more than the recent few, fewer than the kept sets
        sets.shared({"application_name": f"other {n}"})
    assert sets.shared({"application_name": "app"}) is kept


def test_a_new_dict_is_kept_as_given_and_never_changed() -> None:
    sets = ParameterSets()
    given = {"DateStyle": "ISO, MDY"}
    assert sets.shared(given) is given
    assert sets.shared({"DateStyle": "ISO, MDY"}) is given
    assert given == {"DateStyle": "ISO, MDY"}
