"""A tiny random-weight insightface pack, in insightface's own on-disk format, for tests and ``make-tiny``.

No real pack can be downloaded here, so the insightface code path is exercised with graphs built from scratch with
``onnx.helper`` that insightface's ``model_zoo`` routes exactly like the real files:

- ``det_tiny.onnx`` is SCRFD-shaped: input ``(1, 3, H, W)`` with dynamic H/W, 9 outputs (3 strides x 2 anchors, with
  keypoints) ordered scores 8/16/32, boxes 8/16/32, keypoints 8/16/32, each ``(H/s * W/s * 2, 1|4|10)``. Each level is
  an average pool by its stride and a 1x1 convolution; scores pass through a sigmoid, box distances a softplus.
- ``rec_tiny.onnx`` is ArcFace-shaped: input ``(N, 3, 112, 112)``, one ``(N, 512)`` output (a pool and a linear layer).
- optionally ``2d106_tiny.onnx``, shaped like insightface's 106-point landmark model (``(N, 3, 192, 192)`` -> 212).

The weights are random (numbers mean nothing), deterministic for a seed, and the files are byte-identical across runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DETECTOR_FILE = "det_tiny.onnx"
RECOGNIZER_FILE = "rec_tiny.onnx"
LANDMARK_FILE = "2d106_tiny.onnx"
INFO_FILE = "farm_tiny_pack.json"
STRIDES = (8, 16, 32)
ANCHORS = 2
EMBED_DIM = 512
REC_SIZE = 112
REC_POOL = 16
OPSET = 13
IR_VERSION = 8


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("writing the tiny insightface pack needs: pip install onnx") from exc
    return onnx, TensorProto, helper, numpy_helper


def _model(graph, helper):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lynx-farm-tiny")
    model.ir_version = IR_VERSION
    return model


def build_detector(rng: np.random.Generator):
    """The SCRFD-shaped graph (an ``onnx.ModelProto``)."""
    onnx, TensorProto, helper, numpy_helper = _onnx()
    nodes, inits = [], []
    outputs: dict[str, list] = {"score": [], "bbox": [], "kps": []}
    for stride in STRIDES:
        pooled = f"pool_{stride}"
        nodes.append(
            helper.make_node(
                "AveragePool", ["input.1"], [pooled], kernel_shape=[stride, stride], strides=[stride, stride]
            )
        )
        for head, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            channels = ANCHORS * width
            weight = rng.standard_normal((channels, 3, 1, 1)).astype(np.float32)
            bias = (rng.standard_normal(channels) * 0.1).astype(np.float32)
            if head == "score":
                bias -= 2.0  # only some anchors clear insightface's 0.5 threshold; flat images give none
            if head == "bbox":
                bias += 3.0  # box sides about six strides (48 px at stride 8): portrait-sized, not specks
            w_name, b_name = f"{head}{stride}_w", f"{head}{stride}_b"
            inits += [numpy_helper.from_array(weight, w_name), numpy_helper.from_array(bias, b_name)]
            conv, nhwc, flat = f"{head}{stride}_conv", f"{head}{stride}_nhwc", f"{head}{stride}_flat"
            shape_name = f"{head}{stride}_shape"
            inits.append(numpy_helper.from_array(np.array([-1, width], dtype=np.int64), shape_name))
            nodes += [
                helper.make_node("Conv", [pooled, w_name, b_name], [conv]),
                helper.make_node("Transpose", [conv], [nhwc], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [nhwc, shape_name], [flat]),
            ]
            out = f"{head}_{stride}"
            act = {"score": "Sigmoid", "bbox": "Softplus", "kps": "Identity"}[head]
            nodes.append(helper.make_node(act, [flat], [out]))
            outputs[head].append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [f"n{head}{stride}", width]))
    graph = helper.make_graph(
        nodes,
        "scrfd_tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        initializer=inits,
    )
    model = _model(graph, helper)
    onnx.checker.check_model(model)
    return model


def _pooled_linear(rng: np.random.Generator, name: str, size: int, pool: int, out_dim: int):
    """``(N, 3, size, size)`` -> average pool -> flatten -> linear -> ``(N, out_dim)``: the shape of ArcFace heads."""
    onnx, TensorProto, helper, numpy_helper = _onnx()
    cells = 3 * (size // pool) ** 2
    weight = (rng.standard_normal((cells, out_dim)) / np.sqrt(cells)).astype(np.float32)
    bias = (rng.standard_normal(out_dim) * 0.01).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", out_dim])],
        initializer=[numpy_helper.from_array(weight, "fc_w"), numpy_helper.from_array(bias, "fc_b")],
    )
    model = _model(graph, helper)
    onnx.checker.check_model(model)
    return model


def build_recognizer(rng: np.random.Generator):
    """The ArcFace-shaped graph (an ``onnx.ModelProto``)."""
    return _pooled_linear(rng, "arcface_tiny", REC_SIZE, REC_POOL, EMBED_DIM)


def build_landmarks(rng: np.random.Generator):
    """A 2d106det-shaped graph (192x192 in, 212 out): packs carry such models, which loaders must skip."""
    return _pooled_linear(rng, "landmark_tiny", 192, 16, 212)


def write_tiny_insightface_pack(
    directory: str | Path, seed: int = 0, with_detector: bool = True, with_landmarks: bool = False
) -> Path:
    """Write the tiny pack into ``directory`` (created if needed); returns the folder.

    ``with_detector=False`` writes only the recognizer; ``with_landmarks=True`` adds ``2d106_tiny.onnx``, a model
    that is neither detector nor recognizer (like the landmark/attribute files of buffalo_l and antelopev2).
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    rng_det, rng_rec, rng_lmk = (np.random.default_rng([seed, i]) for i in (0, 1, 2))
    files = []
    if with_detector:
        (folder / DETECTOR_FILE).write_bytes(build_detector(rng_det).SerializeToString())
        files.append(DETECTOR_FILE)
    (folder / RECOGNIZER_FILE).write_bytes(build_recognizer(rng_rec).SerializeToString())
    files.append(RECOGNIZER_FILE)
    if with_landmarks:
        (folder / LANDMARK_FILE).write_bytes(build_landmarks(rng_lmk).SerializeToString())
        files.append(LANDMARK_FILE)
    info = {"random_weights": True, "seed": seed, "files": files, "note": "tiny test pack; scores are meaningless"}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return folder
