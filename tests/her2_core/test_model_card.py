"""The model card as one typed class (her2_core.model_card.ModelCard): written by export, read by the worker."""

import json
import re

import pytest

from her2_analysis.options import BUNDLED_MODEL
from her2_core.facts import MAGNIFICATION_MPP
from her2_core.model_card import ModelCard, ModelCardError, load_model_card


def bundled() -> dict:
    return json.loads(BUNDLED_MODEL.with_suffix(".json").read_text())


def test_the_bundled_card_reads_and_writes_back_unchanged():
    card = ModelCard.from_dict(bundled())
    assert card.to_dict() == bundled()
    assert card == load_model_card(BUNDLED_MODEL, white_fraction_max=card.white_fraction_max)
    assert MAGNIFICATION_MPP[card.magnification] == card.mpp


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(classes=["1+", "2+", "3+"]), r": classes \['1\+', '2\+', '3\+'\] are not"),
    (lambda d: d["input"].update(mpp=0.5), r": magnification 10x with 0.5 um/px is not one of"),
    (lambda d: d["preprocessing"]["stain"].update(method="macenko"), r": stain normalisation 'macenko' does not"),
    (lambda d: d["input"].pop("tile_size"), r" is malformed: KeyError\('tile_size'\)"),
])
def test_a_card_that_does_not_fit_is_refused_with_its_path_and_reason(tmp_path, change, message):
    card = bundled()
    change(card)
    model = tmp_path / "m.onnx"
    model.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match="^model card " + re.escape(str(tmp_path / "m.json")) + message):
        load_model_card(model)


def test_the_configured_white_fraction_must_be_the_cards():
    with pytest.raises(ModelCardError, match=r"trained with white_fraction_max=0\.6, worker configured with 0\.5"):
        load_model_card(BUNDLED_MODEL, white_fraction_max=0.5)
