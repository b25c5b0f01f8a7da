"""The official Lynx face embedder (facexlib's IR-SE50 ArcFace) on our module: key layout, loading, preprocessing,
and its use by the backend.

``irse50_keys.json`` lists the state-dict keys and shapes of facexlib's ``Backbone(50, 0.6, 'ir_se')`` (generated
once from that class on the meta device). With ``FACEXLIB_SRC`` pointing at a facexlib checkout (outside this repo),
the tests also build facexlib's own class and compare keys and outputs with it directly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from farm import storage
from farm.identity.dlib_models import DlibDetector
from farm.identity.faces import largest_face
from farm.models.lynx import face as lynx_face
from farm.models.lynx.arcface import (
    ARCFACE_FILE,
    IRSE,
    OFFICIAL,
    TINY,
    IRSE50Embedder,
    _randomize,
    infer_config,
    irse50_embedder,
    load_irse50,
    preprocess,
    write_tiny_irse50,
)
from farm.models.lynx.backend import LynxBackend
from farm.models.lynx.face import arcface_crop, face_models
from farm.models.lynx.tiny import ARCFACE_DIRNAME
from farm.models.lynx.weights import LynxWeightsError, WrongKeyError, WrongShapeError
from farm.types import ModelSpec
from tests.models.lynx_helpers import adapter_dir, base_dir, tiny_checkpoint

ASTRONAUT = "pkg://skimage/data/astronaut.png"
KEYS_FIXTURE = Path(__file__).with_name("irse50_keys.json")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return storage.read_image(ASTRONAUT)


@pytest.fixture(scope="module")
def astronaut_face(astronaut: np.ndarray):
    face = largest_face(DlibDetector().detect(astronaut))
    assert face is not None
    return face


def tiny_arcface() -> Path:
    return tiny_checkpoint() / ARCFACE_DIRNAME / ARCFACE_FILE


def facexlib_arch():
    """facexlib's ``arcface_arch`` module from the checkout at ``$FACEXLIB_SRC`` (skips the test without it)."""
    src = os.environ.get("FACEXLIB_SRC")
    if not src:
        pytest.skip("set FACEXLIB_SRC to a facexlib checkout to compare with its own IR-SE50 class")
    path = Path(src) / "facexlib" / "recognition" / "arcface_arch.py"
    spec = importlib.util.spec_from_file_location("facexlib_arcface_arch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


# ---------------------------------------------------------------------------------------------- (1) key layout
def test_full_size_keys_match_the_official_network() -> None:
    with torch.device("meta"):
        ours = shapes(IRSE(OFFICIAL))
    fixture = [(k, tuple(s)) for k, s in json.loads(KEYS_FIXTURE.read_text())["state_dict"]]
    assert len(ours) == 397 and ours == fixture  # same names, shapes and order
    assert sum(int(np.prod(s)) for _, s in ours) == 43_824_118  # ~175 MB in fp32, as the official file


def test_full_size_keys_match_facexlib_class() -> None:
    arch = facexlib_arch()
    with torch.device("meta"):
        theirs = shapes(arch.Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se"))
        ours = shapes(IRSE(OFFICIAL))
    assert ours == theirs


# ---------------------------------------------------------------------------------------------- (2) tiny file
def test_tiny_file_round_trips_with_the_architecture_inferred(tmp_path: Path) -> None:
    path = tiny_arcface()
    assert path.is_file() and path.stat().st_size < 5_000_000
    model, local = load_irse50(str(path))
    assert local == path and model.config == TINY and not model.training
    tensors = torch.load(str(path), weights_only=True)
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())
    # Same seed, same bytes; another seed, other weights.
    again = write_tiny_irse50(tmp_path / "a" / ARCFACE_FILE, seed=0)
    other = write_tiny_irse50(tmp_path / "b" / ARCFACE_FILE, seed=1)
    assert again.read_bytes() == path.read_bytes() and other.read_bytes() != path.read_bytes()
    # The official layout is inferred from the official shapes too (no tensors needed: meta device).
    with torch.device("meta"):
        assert infer_config("official", IRSE(OFFICIAL).state_dict()) == OFFICIAL


def test_files_without_batchnorm_counters_load(tmp_path: Path) -> None:
    """Checkpoints saved by old torch versions have no ``num_batches_tracked``; they never change the output."""
    tensors = torch.load(str(tiny_arcface()), weights_only=True)
    stripped = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    assert len(stripped) < len(tensors)
    torch.save(stripped, tmp_path / ARCFACE_FILE)
    model, _ = load_irse50(str(tmp_path / ARCFACE_FILE))
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    reference, _ = load_irse50(str(tiny_arcface()))
    assert torch.equal(model(x), reference(x))


def test_remote_file_is_cached_on_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/weights/arcface/" + ARCFACE_FILE, tiny_arcface().read_bytes())
    model, local = load_irse50("memory://weights/arcface/" + ARCFACE_FILE)
    assert local.read_bytes() == tiny_arcface().read_bytes() and str(local).startswith(str(tmp_path / "cache"))
    assert model.config == TINY
    assert load_irse50("memory://weights/arcface/" + ARCFACE_FILE)[1] == local
    with pytest.raises(FileNotFoundError, match="missing arcface file"):
        load_irse50("memory://weights/arcface/nothing.pth")


# ---------------------------------------------------------------------------------------------- (3), (4) output
def official_input(image: np.ndarray, kps: np.ndarray) -> torch.Tensor:
    """The official preprocessing by hand: insightface's norm_crop, ToTensor (/255), Normalize(0.5, 0.5), BGR."""
    from insightface.utils import face_align

    crop = face_align.norm_crop(image, landmark=np.asarray(kps), image_size=112)
    x = crop.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x[None, [2, 1, 0]]))


def test_preprocessing_is_the_official_one(astronaut: np.ndarray, astronaut_face) -> None:
    from insightface.utils import face_align

    crop = arcface_crop(astronaut, astronaut_face.kps)
    assert np.array_equal(crop, face_align.norm_crop(astronaut, landmark=astronaut_face.kps, image_size=112))
    x = preprocess(crop)
    assert x.shape == (1, 3, 112, 112) and x.dtype == torch.float32
    assert torch.equal(x, official_input(astronaut, astronaut_face.kps))
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0


def test_embedding_is_unit_and_equals_the_network_on_the_official_input(astronaut, astronaut_face) -> None:
    embedder = irse50_embedder(str(tiny_arcface()))
    vector = embedder.embed(astronaut, astronaut_face)
    assert vector.shape == (512,) and vector.dtype == np.float32 and embedder.dim == 512
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert np.array_equal(embedder.embed_raw(astronaut, astronaut_face), vector)  # the official output is unit
    with torch.inference_mode():
        expected = embedder.model(official_input(astronaut, astronaut_face.kps))[0].numpy()
    assert np.array_equal(vector, expected)
    # The face matters: another crop gives another vector.
    shifted = astronaut_face.kps + np.float32(6.0)
    assert (
        float(np.abs(embedder.embed(astronaut, type(astronaut_face)(astronaut_face.bbox, shifted, 1.0)) - vector).max())
        > 1e-3
    )
    assert len(embedder.fingerprint()) == 12


def test_same_numbers_as_facexlib_on_the_astronaut(astronaut, astronaut_face, tmp_path: Path) -> None:
    """facexlib's own Backbone(50, 0.6, 'ir_se') and ours, same random full-size weights, official input."""
    arch = facexlib_arch()
    ours = IRSE(OFFICIAL)
    _randomize(ours, seed=3)
    path = tmp_path / ARCFACE_FILE
    torch.save(ours.state_dict(), path)
    theirs = arch.Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se").eval()
    theirs.load_state_dict(torch.load(str(path), weights_only=True), strict=True)
    model, local = load_irse50(str(path))
    assert model.config == OFFICIAL
    vector = IRSE50Embedder(model, local).embed(astronaut, astronaut_face)
    with torch.inference_mode():
        reference = theirs(official_input(astronaut, astronaut_face.kps))[0].numpy()
    diff = float(np.abs(vector - reference).max())
    print(f"max abs diff vs facexlib: {diff:.3g}")
    assert diff < 1e-5


# ---------------------------------------------------------------------------------------------- (5) backend
def lynx_spec(**weights) -> ModelSpec:
    roles = {"base": base_dir(), "adapter": adapter_dir("full"), **weights}
    return ModelSpec(backend="lynx", variant="full", weights=roles, options={"face_detector": "dlib"})


def test_backend_uses_the_official_embedder_when_given(astronaut, astronaut_face) -> None:
    backend = LynxBackend(lynx_spec(arcface=str(tiny_arcface())))  # no face_pack needed with dlib + arcface
    subject = backend.prepare_subject(astronaut)
    expected = irse50_embedder(str(tiny_arcface())).embed(astronaut, astronaut_face)
    assert np.array_equal(subject.embedding, expected)
    assert isinstance(backend._face_models()[1], IRSE50Embedder)


def test_backend_without_arcface_normalises_the_pack_embedding(astronaut, astronaut_face, caplog) -> None:
    pack = str(tiny_checkpoint() / "insightface")
    lynx_face._WARNED.discard(pack)
    face_models.cache_clear()
    with caplog.at_level(logging.WARNING, logger="farm.models.lynx.face"):
        backend = LynxBackend(lynx_spec(face_pack=pack))
        subject = backend.prepare_subject(astronaut)
        LynxBackend(lynx_spec(face_pack=pack)).prepare_subject(astronaut)
        face_models.cache_clear()
        LynxBackend(lynx_spec(face_pack=pack)).prepare_subject(astronaut)
    warnings = [r for r in caplog.records if "weights.arcface" in r.getMessage()]
    assert len(warnings) == 1  # once per pack and process
    raw = backend._face_models()[1].embed_raw(astronaut, astronaut_face)
    assert float(np.linalg.norm(raw)) > 2.0  # the pack's vector is not unit: it must be normalised
    assert abs(float(np.linalg.norm(subject.embedding)) - 1.0) < 1e-5
    np.testing.assert_allclose(subject.embedding, raw / np.linalg.norm(raw), rtol=0, atol=1e-6)


def test_backend_fingerprint_names_the_embedder() -> None:
    pack = str(tiny_checkpoint() / "insightface")
    official = LynxBackend(lynx_spec(arcface=str(tiny_arcface())))
    fallback = LynxBackend(lynx_spec(face_pack=pack))
    for backend in (official, fallback):  # the fingerprint reads only the folders of the loaded model
        backend.pipeline = SimpleNamespace(model=SimpleNamespace(base_dir=base_dir(), adapter_dir=adapter_dir("full")))
    assert official.fingerprint() != fallback.fingerprint() and len(official.fingerprint()) == 16


def test_missing_pack_is_named_when_needed() -> None:
    with pytest.raises(ValueError, match="face_pack .*ArcFace .*weights.arcface"):
        LynxBackend(lynx_spec()).prepare_subject(np.zeros((64, 64, 3), np.uint8))
    spec = lynx_spec(arcface=str(tiny_arcface()))
    spec.options["face_detector"] = "insightface"
    with pytest.raises(ValueError, match="face_pack .*detector"):
        LynxBackend(spec).prepare_subject(np.zeros((64, 64, 3), np.uint8))


# ---------------------------------------------------------------------------------------------- (6) errors
def test_wrong_shape_names_file_key_and_expected_shape(tmp_path: Path) -> None:
    tensors = torch.load(str(tiny_arcface()), weights_only=True)
    tensors["body.2.res_layer.3.weight"] = torch.zeros(20, 20, 5, 5)
    path = tmp_path / ARCFACE_FILE
    torch.save(tensors, path)
    with pytest.raises(WrongShapeError) as info:
        load_irse50(str(path))
    message = str(info.value)
    assert str(path) in message and "'body.2.res_layer.3.weight'" in message
    assert "expected (20, 20, 3, 3)" in message and "(20, 20, 5, 5)" in message


def test_other_bad_files_are_named(tmp_path: Path) -> None:
    tensors = torch.load(str(tiny_arcface()), weights_only=True)
    missing = {k: v for k, v in tensors.items() if k != "output_layer.3.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WrongKeyError, match=r"missing keys output_layer\.3\.bias \(512,\)"):
        load_irse50(str(tmp_path / "missing.pth"))
    wide = dict(
        tensors, **{"output_layer.3.weight": torch.zeros(256, 32 * 49), "output_layer.3.bias": torch.zeros(256)}
    )
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(WrongShapeError, match=r"output_layer\.3\.weight. has shape \(256, 1568\), expected \(512, "):
        load_irse50(str(tmp_path / "wide.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LynxWeightsError, match="junk.pth: not a readable torch state dict"):
        load_irse50(str(tmp_path / "junk.pth"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(LynxWeightsError, match="no consecutive body"):
        load_irse50(str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError, match="missing arcface file"):
        load_irse50(str(tmp_path / "absent.pth"))
