"""Export formats a plugin adds through ``register_export_formats``: listed beside the built-in ones,
written from any backend with an ``hf`` export, and refused in one line when a name is taken."""

from __future__ import annotations

import json
import types

import pytest

from q8core import export as exporting
from q8core.errors import Q8Error
from q8core.export import ExportFormat
from q8core.hookspecs import hookimpl
from q8core.plugins import load_registry
from q8core.spec import QuantSpec


def _write_config(backend, directory):
    """A toy format: the backend's Hugging Face config, nothing else."""
    _, config_text = exporting.hf_export(backend)
    (directory / "toy.json").write_text(config_text, encoding="utf-8")
    return ["toy.json"]


def _plugin(*formats):
    @hookimpl
    def register_export_formats(register):
        for fmt in formats:
            register(fmt)
    return types.SimpleNamespace(register_export_formats=register_export_formats)


TOY = ExportFormat("toy", "the config alone", "torch", _write_config)


def test_a_plugins_format_is_listed_and_written(tiny_bert, tmp_path):
    registry = load_registry(extra_plugins=(_plugin(TOY),))
    torch_cls = registry.backend("torch")
    assert "toy" in exporting.formats(torch_cls, registry.formats())
    assert exporting.shared_format(torch_cls, "toy", registry.formats()) is TOY
    backend = torch_cls.from_pretrained(str(tiny_bert), labels=("0", "1"), spec=QuantSpec(), device="cpu", seed=0)
    assert exporting.export(backend, tmp_path, "toy", registry.formats()) == ["toy.json"]
    assert json.loads((tmp_path / "toy.json").read_text())["hidden_size"] == 32
    with pytest.raises(Q8Error, match="cannot export 'toy'"):  # without the plugin the format is unknown
        exporting.check_format(torch_cls, "toy", load_registry().formats())


@pytest.mark.parametrize("formats,message", [
    ((TOY, TOY), "export format 'toy' is registered twice"),
    ((ExportFormat("onnx-int8", "mine", "torch", _write_config),), "export format 'onnx-int8' is built in"),
])
def test_a_taken_format_name_is_refused(formats, message):
    with pytest.raises(Q8Error, match=message):
        load_registry(extra_plugins=(_plugin(*formats),))
