"""Label maps between a model's classes and an external set's coarser labels."""

import numpy as np
import pytest

from wbc.errors import WbcError
from wbc.labelmap import LabelMap
from wbc.metrics import classification_metrics

MODEL = ["BNE", "SNE", "LY", "MO", "ERB"]
SET = ["NE", "LY", "MO", "BA"]


def test_parse_inline_identity_and_lists():
    lm = LabelMap.parse("SNE=NE, BNE=NE,", MODEL, SET)
    assert lm.mapping == {"BNE": "NE", "SNE": "NE", "LY": "LY", "MO": "MO"}
    assert lm.unmapped_model == ["ERB"]
    assert lm.unscorable == ["BA"]
    assert lm.scored_labels == ["NE", "LY", "MO"]
    summary = lm.summary()
    assert "ERB" in summary and "BA" in summary  # listed, never silently dropped
    np.testing.assert_array_equal(
        lm.matrix(), [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
    )
    assert lm.to_dict()["unscorable"] == ["BA"]


def test_explicit_entries_override_identity():
    # LY sent to nothing: the set's LY becomes unscorable, the model's LY mass is dropped.
    lm = LabelMap.parse("SNE=NE,BNE=NE,LY=", MODEL, SET)
    assert "LY" not in lm.mapping and lm.unmapped_model == ["LY", "ERB"]
    assert lm.unscorable == ["LY", "BA"]
    assert LabelMap.parse(None, ["NE", "LY"], SET).mapping == {"NE": "NE", "LY": "LY"}


def test_yaml_and_csv_files_equal_inline(tmp_path):
    inline = LabelMap.parse("SNE=NE,BNE=NE,ERB=", MODEL, SET)
    y = tmp_path / "map.yaml"
    y.write_text("SNE: NE\nBNE: NE\nERB: null\n")
    c = tmp_path / "map.csv"
    c.write_text("model,set\n# neutrophils\nSNE,NE\nBNE,NE\nERB,\n")
    for path in (y, str(y), c, str(c)):
        lm = LabelMap.parse(path, MODEL, SET)
        assert lm.mapping == inline.mapping and lm.given == inline.given


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("XNE=NE", r"unknown model class\(es\) \['XNE'\].*BNE"),
        ("SNE=NEU", r"unknown set label\(s\) \['NEU'\].*'NE'"),
        ("SNE", "bad entry 'SNE'; expected MODEL=SET"),
        ("SNE=NE,SNE=LY", "mapped twice"),
        ("missing.yaml", "label map file not found"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(WbcError, match=match):
        LabelMap.parse(text, MODEL, SET)


def test_no_mappable_class_is_an_error():
    with pytest.raises(WbcError, match="share no class with the model"):
        LabelMap.parse("", MODEL, ["neutrophil", "lymphocyte"])
    with pytest.raises(WbcError, match="share no class"):
        LabelMap.parse("LY=,MO=", ["LY", "MO"], ["LY", "MO"])


def test_bad_yaml_shape(tmp_path):
    p = tmp_path / "m.yml"
    p.write_text("- SNE\n- NE\n")
    with pytest.raises(WbcError, match="expected a mapping"):
        LabelMap.parse(p, MODEL, SET)


# Columns: BNE, SNE, LY, MO, ERB. Expected predictions worked out by hand in the comments.
PROBS = np.array(
    [
        [0.3, 0.3, 0.4, 0.0, 0.0],  # NE: NE .6 > LY .4 -> NE (a plain argmax says LY)
        [0.1, 0.1, 0.3, 0.0, 0.5],  # LY: ERB dropped; NE .2 < LY .3 -> LY
        [0.0, 0.0, 0.2, 0.7, 0.1],  # MO: -> MO
        [0.0, 0.6, 0.2, 0.2, 0.0],  # MO: -> NE (wrong)
        [0.1, 0.0, 0.5, 0.4, 0.0],  # LY: -> LY
        [0.2, 0.2, 0.5, 0.1, 0.0],  # NE: NE .4 < LY .5 -> LY (wrong)
        [0.9, 0.0, 0.0, 0.0, 0.1],  # BA: unscorable, left out
        [0.5, 0.4, 0.1, 0.0, 0.0],  # NE: -> NE
    ]
)
LABELS = ["NE", "LY", "MO", "MO", "LY", "NE", "BA", "NE"]


def test_score_hand_made_example():
    lm = LabelMap.parse("SNE=NE,BNE=NE", MODEL, SET)
    res = lm.score(PROBS, LABELS)
    assert res.labels == ["NE", "LY", "MO"]
    np.testing.assert_array_equal(res.y_true, [0, 1, 2, 2, 1, 0, 0])
    np.testing.assert_array_equal(res.y_pred, [0, 1, 2, 0, 1, 1, 0])
    np.testing.assert_array_equal(res.kept, [1, 1, 1, 1, 1, 1, 0, 1])
    assert res.dropped == {"BA": 1}
    np.testing.assert_allclose(res.coverage, [1, 0.5, 0.9, 1, 1, 1, 1])
    np.testing.assert_allclose(res.probs[1], [0.4, 0.6, 0.0])  # renormalised over NE, LY, MO
    np.testing.assert_allclose(res.probs.sum(1), 1.0)

    # Confusion (rows true NE, LY, MO): [[2, 1, 0], [0, 2, 0], [1, 0, 1]].
    # F1: NE 2*2/(4+1+1) = 2/3, LY 2*2/(4+1+0) = 4/5, MO 2*1/(2+0+1) = 2/3 -> MF1 = 32/45.
    # Recall: 2/3, 1, 1/2 -> BAcc = 13/18. Precision: 2/3, 2/3, 1 -> MP = 7/9. Accuracy 5/7.
    m = classification_metrics(res.y_true, res.y_pred, len(res.labels))
    np.testing.assert_array_equal(m["confusion"], [[2, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert m["mf1"] == pytest.approx(32 / 45)
    assert m["bacc"] == pytest.approx(13 / 18)
    assert m["mp"] == pytest.approx(7 / 9)
    assert m["acc"] == pytest.approx(5 / 7)


def test_score_accepts_label_indices_and_checks_inputs():
    lm = LabelMap.parse("SNE=NE,BNE=NE", MODEL, SET)
    idx = np.array([SET.index(s) for s in LABELS])
    by_name, by_index = lm.score(PROBS, LABELS), lm.score(PROBS, idx)
    np.testing.assert_array_equal(by_name.y_pred, by_index.y_pred)
    np.testing.assert_array_equal(by_name.y_true, by_index.y_true)
    with pytest.raises(WbcError, match=r"\['EO'\] are not among the set's labels"):
        lm.score(PROBS[:1], ["EO"])
    with pytest.raises(WbcError, match="outside the set's labels"):
        lm.score(PROBS[:1], np.array([7]))
    with pytest.raises(ValueError, match="probs must be"):
        lm.score(PROBS[:, :4], LABELS)
