"""Criteria: validation, the shipped set, YAML loading, name resolution."""

from __future__ import annotations

import pytest

import icon2_lens as il
from icon2_lens.criteria import resolve_criteria


def test_default_criteria():
    assert [c.name for c in il.DEFAULT_CRITERIA] == ["general", "helpful", "honest", "harmless"]
    for c in il.DEFAULT_CRITERIA:
        assert c.positive.strip() and c.negative.strip() and c.positive != c.negative
    assert il.DEFAULT_CRITERIA[1].to_dict() == {
        "name": "helpful", "positive": "You are a helpful assistant.", "negative": "You are a helpless assistant."
    }


def test_criterion_is_frozen():
    c = il.Criterion("concise", "Be brief.", "Be long-winded.")
    with pytest.raises(AttributeError):
        c.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("pos,neg", [("Be nice.", "Be nice."), ("Be nice.", "  Be nice.  ")])
def test_identical_prompts_refused(pos, neg):
    with pytest.raises(ValueError, match="identical"):
        il.Criterion("same", pos, neg)


@pytest.mark.parametrize("pos,neg", [("", "Be rude."), ("Be nice.", "   ")])
def test_empty_prompts_refused(pos, neg):
    with pytest.raises(ValueError, match="empty"):
        il.Criterion("x", pos, neg)


@pytest.mark.parametrize("name", ["", "1abc", "has space", "score/x", "é", None, "a.b"])
def test_bad_names_refused(name):
    with pytest.raises(ValueError, match="not valid"):
        il.Criterion(name, "Be nice.", "Be rude.")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a", "concise", "Kind_2", "anti-verbose"])
def test_good_names(name):
    assert il.Criterion(name, "Be nice.", "Be rude.").name == name


def test_yaml_list_form(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "- {name: concise, positive: 'Be brief.', negative: 'Be long-winded.'}\n"
        "- name: polite\n  positive: Be polite.\n  negative: Be rude.\n"
    )
    crits = il.load_criteria(p)
    assert crits == [il.Criterion("concise", "Be brief.", "Be long-winded."), il.Criterion("polite", "Be polite.", "Be rude.")]
    q = tmp_path / "wrapped.yml"
    q.write_text("criteria:\n  - {name: concise, positive: 'Be brief.', negative: 'Be long-winded.'}\n")
    assert [c.name for c in il.load_criteria(q)] == ["concise"]
    assert resolve_criteria(str(q)) == il.load_criteria(q)
    assert resolve_criteria(q) == il.load_criteria(q)


def test_yaml_mapping_form(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("concise:\n  positive: Be brief.\n  negative: Be long-winded.\npolite: {positive: Be polite., negative: Be rude.}\n")
    crits = il.load_criteria(p)
    assert [(c.name, c.positive, c.negative) for c in crits] == [
        ("concise", "Be brief.", "Be long-winded."), ("polite", "Be polite.", "Be rude.")
    ]


@pytest.mark.parametrize(
    "text,match",
    [
        ("[]\n", "non-empty list"),
        ("just a string\n", "non-empty list"),
        ("- {name: a, positive: x}\n", "exactly name, positive, negative"),
        ("- {name: a, positive: x, negative: y, extra: z}\n", "exactly name, positive, negative"),
        ("- plain string\n", "exactly name, positive, negative"),
        ("a: just text\n", "exactly name, positive, negative"),
        ("- {name: a, positive: x, negative: x}\n", "identical"),
        ("- {name: 'bad name', positive: x, negative: y}\n", "not valid"),
        ("- {name: a, positive: x, negative: y}\n- {name: a, positive: u, negative: v}\n", "unique"),
        ("- {name: a, positive: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_refused(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        il.load_criteria(p)


def test_missing_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        il.load_criteria(tmp_path / "nope.yaml")


def test_resolve_names_and_objects():
    assert resolve_criteria(None) == list(il.DEFAULT_CRITERIA)
    assert [c.name for c in resolve_criteria("helpful, honest")] == ["helpful", "honest"]
    custom = il.Criterion("concise", "Be brief.", "Be long-winded.")
    assert resolve_criteria(custom) == [custom]
    assert [c.name for c in resolve_criteria(["harmless", custom])] == ["harmless", "concise"]
    with pytest.raises(ValueError, match="Unknown criterion 'kindness'"):
        resolve_criteria(["helpful", "kindness"])
    with pytest.raises(ValueError, match="Unknown criterion"):
        resolve_criteria([42])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="No criteria"):
        resolve_criteria(" , ")
    with pytest.raises(ValueError, match="unique"):
        resolve_criteria(["helpful", "helpful"])
