"""The production recognizer: SCRFD + ArcFace from an insightface model pack the user points to.

A pack is a folder of ONNX files (``buffalo_l``: ``det_10g.onnx`` + ``w600k_r50.onnx`` + landmark/attribute models;
``antelopev2``: ``scrfd_10g_bnkps.onnx`` + ``glintr100.onnx`` + ...), a zip of one, or any fsspec URI of either.
Remote packs are copied once into a local cache (keyed by URI) and reused. Like insightface's ``FaceAnalysis`` we
route every file by its graph through ``insightface.model_zoo.get_model`` and keep the first detector and the first
recognizer (a pack with insightface's version-2 ``manifest.json`` names those two files itself), so we run
insightface's own SCRFD and ArcFace classes (same pre-processing and alignment as Lynx's evaluation). Images arrive
here as RGB and are handed to insightface as BGR, which is what its models expect.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from farm import storage
from farm.cache import UnsafeNameError, check_collisions, claim_name, fetch_folder, node_cache, safe_relpath
from farm.identity.faces import (
    Face,
    FaceDetector,
    FaceEmbedder,
    check_image,
    file_digest,
    l2_normalize,
    make_face,
)

CPU_PROVIDERS = ["CPUExecutionProvider"]
DEFAULT_DET_SIZE = (640, 640)
_DONE = ".farm-complete"
MANIFEST_FILE = "manifest.json"  # insightface's task manifest (version 2)
# insightface's face_align still calls scikit-image's deprecated estimate(); the result is unchanged.
warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning)


def cache_root() -> Path:
    """Where remote and zipped packs are unpacked: the node cache's ``insightface/``."""
    return node_cache("insightface")


def _insightface_model_zoo():
    try:
        from insightface.model_zoo import model_zoo
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("the insightface recognizer needs: pip install insightface onnxruntime") from exc
    return model_zoo


def _find_onnx_dir(root: Path) -> Path:
    """The folder holding the pack's ONNX files (antelopev2 zips nest one level deeper)."""
    if any(root.glob("*.onnx")):
        return root
    nested = sorted({p.parent for p in root.rglob("*.onnx")})
    if not nested:
        raise FileNotFoundError(f"no .onnx files under {root}; point identity.pack at an insightface model pack")
    return nested[0]


def local_pack_dir(uri: str, storage_options: dict[str, Any] | None = None) -> Path:
    """A local folder with the pack's ONNX files: the folder itself, or a cached copy of a remote or zipped pack."""
    if storage.is_local(uri) and not uri.endswith(".zip"):
        fs, path = storage.get_fs(uri)
        local = Path(path)
        if not local.is_dir():
            raise FileNotFoundError(f"insightface pack {uri!r} is not a folder; give the folder of its .onnx files")
        return _find_onnx_dir(local)
    if not uri.endswith(".zip"):  # a remote folder: the shared, verified node cache
        try:
            return _find_onnx_dir(fetch_folder(uri, "insightface", storage_options))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no .onnx files under {uri!r}; point identity.pack at an insightface model pack"
            ) from None
    target = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / _DONE).exists():
        return _find_onnx_dir(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / _DONE).exists():
            _materialize(uri, target, storage_options)
    return _find_onnx_dir(target)


def _materialize(uri: str, target: Path, storage_options: dict[str, Any] | None) -> None:
    """Unzip a zipped pack into ``target`` and mark it complete, so a crash never leaves a half pack in use."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fs, path = storage.get_fs(uri, storage_options)
    archive = target.with_name(target.name + ".zip.partial")  # beside the staging folder: no member can clobber it
    try:
        with fs.open(path, "rb") as src, open(archive, "wb") as dst:
            shutil.copyfileobj(src, dst)
        with zipfile.ZipFile(archive) as zf:
            _extract(zf, uri, staging)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        archive.unlink(missing_ok=True)
    (staging / _DONE).write_text(uri)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _extract(zf: zipfile.ZipFile, uri: str, folder: Path) -> None:
    """Unpack every member below ``folder``, refusing the whole archive when any member could escape it.

    ``zipfile.extractall`` would silently rewrite ``../x`` and ``/x`` to ``x`` (so a hostile member can replace a
    model file); here such a member, a symlink, or two members with one local name raise ``UnsafeNameError``.
    """
    names: dict[str, str] = {}
    members: list[tuple[zipfile.ZipInfo, str]] = []
    for info in zf.infolist():
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeNameError(
                f"{info.filename!r} in {uri!r} is a symlink (unpacking into {folder}); a pack holds regular files only"
            )
        local = safe_relpath(info.filename.rstrip("/") if info.is_dir() else info.filename, uri, folder)
        if info.is_dir():
            continue
        claim_name(names, local, info.filename, uri, folder)
        members.append((info, local))
    check_collisions(names, uri, folder)
    for info, local in members:
        dest = folder / local
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)


def _is_v2_manifest(folder: Path) -> bool:
    from insightface.model_zoo import has_model_package_manifest

    return bool(has_model_package_manifest(folder))


def _to_bgr(image_rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image_rgb[:, :, ::-1])


class InsightFaceDetector(FaceDetector):
    """insightface's SCRFD (needs the keypoint outputs: 9- or 15-output graphs)."""

    def __init__(self, model: Any, det_size: tuple[int, int] = DEFAULT_DET_SIZE, det_thresh: float = 0.5) -> None:
        if not getattr(model, "use_kps", False):
            raise ValueError(f"detector {model.model_file} has no keypoint outputs; use a *_kps / bnkps SCRFD model")
        self.model = model
        self.model.prepare(-1, input_size=tuple(det_size), det_thresh=det_thresh)
        self.name = f"scrfd:{Path(model.model_file).stem}"
        self._digest = file_digest([model.model_file])

    def fingerprint(self) -> str:
        return self._digest

    def detect(self, image_rgb_uint8: np.ndarray) -> list[Face]:
        image = check_image(image_rgb_uint8)
        det, kpss = self.model.detect(_to_bgr(image))
        faces = [make_face(det[i, :4], kpss[i], float(det[i, 4])) for i in range(det.shape[0])]
        faces.sort(key=lambda f: -f.score)
        return faces


class InsightFaceEmbedder(FaceEmbedder):
    """insightface's ArcFace: its own ``norm_crop`` to the model's input size, then the ONNX graph."""

    reports_distance = False

    def __init__(self, model: Any) -> None:
        from insightface.app.common import Face as InsightFace

        self.model = model
        self._face_type = InsightFace
        self.name = f"arcface:{Path(model.model_file).stem}"
        shape = model.output_shape
        self.dim = int(shape[-1]) if isinstance(shape[-1], int) else 512
        self._digest = file_digest([model.model_file])

    def fingerprint(self) -> str:
        return self._digest

    def embed_raw(self, image_rgb_uint8: np.ndarray, face: Face) -> np.ndarray:
        image = check_image(image_rgb_uint8)
        target = self._face_type(bbox=face.bbox, kps=face.kps, det_score=face.score)
        return np.asarray(self.model.get(_to_bgr(image), target), dtype=np.float32).reshape(-1)

    def embed(self, image_rgb_uint8: np.ndarray, face: Face) -> np.ndarray:
        return l2_normalize(self.embed_raw(image_rgb_uint8, face))


def load_insightface_pack(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    det_size: tuple[int, int] = DEFAULT_DET_SIZE,
    det_thresh: float = 0.5,
    threads: int | None = None,
) -> tuple[FaceDetector, FaceEmbedder]:
    """(detector, embedder) from a pack folder, zip or fsspec URI; CPU execution (scoring stays off the GPU).

    ``threads`` caps onnxruntime's intra-op threads per model (``None``: its default, all cores); set 1 when several
    scorers share a machine's cores.
    """
    model_zoo = _insightface_model_zoo()
    folder = local_pack_dir(uri, storage_options)
    kwargs: dict[str, Any] = {"providers": CPU_PROVIDERS}
    if threads is not None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        kwargs["sess_options"] = options
    if (folder / MANIFEST_FILE).is_file() and _is_v2_manifest(folder):
        # insightface's task manifest names the files (and may pin their sha256): no routing by graph.
        detector = model_zoo.get_model(str(folder), model_task="detection", **kwargs)
        recognizer = model_zoo.get_model(str(folder), model_task="recognition", **kwargs)
        return InsightFaceDetector(detector, det_size, det_thresh), InsightFaceEmbedder(recognizer)
    detector = recognizer = None
    for onnx_file in sorted(folder.glob("*.onnx")):
        model = model_zoo.get_model(str(onnx_file), **kwargs)
        task = getattr(model, "taskname", None)
        if task == "detection" and detector is None and getattr(model, "use_kps", False):
            detector = model
        elif task == "recognition" and recognizer is None:
            recognizer = model
        if detector is not None and recognizer is not None:
            break
    found = sorted(p.name for p in folder.glob("*.onnx"))
    if detector is None:
        raise FileNotFoundError(f"no SCRFD detector with keypoints among {found} in pack {uri!r}")
    if recognizer is None:
        raise FileNotFoundError(f"no ArcFace recognizer among {found} in pack {uri!r}")
    return InsightFaceDetector(detector, det_size, det_thresh), InsightFaceEmbedder(recognizer)
