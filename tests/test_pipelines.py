"""The one entry point of the model ports: ``pipelines.from_pretrained`` reads ``model_index.json``."""

import json

import pytest

from cfgzero_theory import pipelines
from cfgzero_theory.sd3.pipeline import SD3Pipeline


def _folder(tmp_path, index):
    folder = tmp_path / "pipe"
    folder.mkdir()
    if index is not None:
        (folder / "model_index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return folder


def test_the_class_named_in_model_index_picks_our_pipeline(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(SD3Pipeline, "from_pretrained",
                        classmethod(lambda cls, folder, **kw: calls.append((cls, folder, kw)) or "loaded"))
    folder = _folder(tmp_path, {"_class_name": "StableDiffusion3Pipeline"})
    assert pipelines.from_pretrained(folder, dtype="bfloat16", compilation_cache=False) == "loaded"
    assert calls == [(SD3Pipeline, str(folder), {"dtype": "bfloat16", "sharding": None, "compilation_cache": False})]


@pytest.mark.parametrize("index, message", [
    ({"_class_name": "KandinskyPipeline"}, "KandinskyPipeline is not ported: .* supported pipeline classes: "
                                           "\\[.FluxPipeline., .LuminaPipeline., .LuminaText2ImgPipeline., "
                                           ".StableDiffusion3Pipeline., .WanImageToVideoPipeline., .WanPipeline.\\]"),
    ({"transformer": ["diffusers", "X"]}, "names no pipeline class"),
    ("{not json", "cannot read"),
    (None, "has no model_index.json"),
])
def test_unknown_or_broken_folders_are_refused_by_name(tmp_path, index, message):
    with pytest.raises(ValueError, match=message):
        pipelines.from_pretrained(_folder(tmp_path, index))


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        pipelines.from_pretrained(tmp_path / "missing")
