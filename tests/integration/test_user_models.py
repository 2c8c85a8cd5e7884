"""User models from local disk: MONAI bundles through MONAI's bundle API, TorchScript models with a manifest.

Everything is made here, nothing is fetched: a real bundle directory (configs/metadata.json with the MONAI
metadata fields, configs/inference.json in the model zoo's layout: LoadImaged ... Spacingd to another
spacing ... SlidingWindowInferer ... Invertd + SaveImaged, a SupervisedEvaluator and its "run" entry,
models/model.pt or models/model.ts), a TorchScript segmenter and a TorchScript CR/DX classifier, each
with a manifest.yaml. The networks are hand-set intensity thresholds (a 1x1x1 convolution), so the
expected result is known exactly: the mask on the source grid must equal the threshold of the source
image up to boundary voxels that resampling may move (Dice >= 0.98).

The source is a DICOM MR series with a flipped row direction (columns run to the patient's right),
anisotropic pixels, slices stacked feet-wards and a non-zero origin, so any axis or flip mistake on the
way to the model grid and back shows. A socket guard fails any test that tries a non-loopback connect.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
import yaml

from dicom_ai_node.devtools.synthetic import write_cr_image, write_mr_series
from dicom_ai_node.domain.results import OutputIdentity, RuleIdentity
from dicom_ai_node.encode.seg import encode_seg
from dicom_ai_node.encode.uids import result_uids
from dicom_ai_node.errors import ConfigError, InferenceError
from dicom_ai_node.infer.bundle import BundleModel
from dicom_ai_node.infer.bundle_manifest import manifest_from_bundle, verify_bundle
from dicom_ai_node.infer.manifest import load_manifest
from dicom_ai_node.infer.registry import build_model, discover_manifests
from dicom_ai_node.infer.volume import Volume, load_series

# The MR phantom: head 300, brain 900 (dicom_ai_node/devtools/synthetic.py); every network here thresholds at 600.
THRESHOLD = 600.0
BRAIN = {"value": "12738006", "scheme": "SCT", "meaning": "Brain"}
# DICOM CID 6105 (Abnormal Lucency Finding or Feature): SCT 36118008 "Pneumothorax".
PNEUMOTHORAX = {"value": "36118008", "scheme": "SCT", "meaning": "Pneumothorax"}
# Row direction towards the patient's right (LPS -x): a flipped axis compared with the usual axial.
FLIPPED_AXIAL = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# --- no network ---------------------------------------------------------------------------------------


def _is_loopback(host: object) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Record (and refuse) every non-loopback connect or name lookup; the test fails if there was one."""
    attempts: list[object] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def remote(sock: socket.socket, address: Any) -> bool:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0])

    def connect(self: socket.socket, address: Any) -> None:
        if remote(self, address):
            attempts.append(address)
            raise OSError(f"test guard: network connect to {address} refused")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if remote(self, address):
            attempts.append(address)
            return 111
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            attempts.append(host)
            raise socket.gaierror(f"test guard: name lookup of {host} refused")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


# --- sources ------------------------------------------------------------------------------------------


def mr_volume(directory: Path, n_slices: int = 16, rows: int = 48, cols: int = 40) -> Volume:
    paths = write_mr_series(
        directory,
        n_slices=n_slices,
        rows=rows,
        cols=cols,
        pixel_spacing=(1.1, 0.9),
        slice_thickness=2.5,
        image_orientation_patient=FLIPPED_AXIAL,
    )
    volume = load_series(paths)
    # The geometry this test is about: flipped row direction, slices towards the feet, off-centre origin.
    assert volume.affine_lps[0, 0] < 0 and volume.affine_lps[2, 2] < 0
    assert np.abs(volume.affine_lps[:3, 3]).min() > 1.0
    return volume


def expected_mask(volume: Volume) -> np.ndarray:
    return (volume.array > THRESHOLD).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def threshold_conv(scale: float) -> torch.nn.Conv3d:
    """1x1x1 conv with logits [0, scale * (x - t)]: argmax/softmax is a threshold at t in model units."""
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    assert conv.bias is not None  # bias=True is Conv3d's default
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        # The bundle scales 0..1000 to 0..1: threshold 0.6 there is 600 in the source.
        conv.weight[1, 0, 0, 0, 0] = scale
        conv.bias[1] = -scale * THRESHOLD / 1000.0
    return conv


def save_torchscript(module: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; users still ship it
        torch.jit.script(module).save(str(path))


# --- a real MONAI bundle ------------------------------------------------------------------------------


def bundle_metadata() -> dict[str, Any]:
    """configs/metadata.json with the fields of the MONAI model zoo's metadata schema."""
    import monai
    import nibabel

    patch = {"type": "image", "num_channels": 1, "spatial_shape": [32, 32, 16], "dtype": "float32"}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.2.0",
        "changelog": {"0.2.0": "threshold network for the node's tests", "0.1.0": "initial"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__, "pytorch-ignite": "0.5.5"},
        "name": "Brain threshold MR segmentation",
        "task": "Brain segmentation on T1-weighted MR (an intensity threshold: a test bundle)",
        "description": "A hand-set 1x1x1 convolution thresholding the scaled MR intensity at 0.6",
        "authors": "dicom-ai-node tests",
        "copyright": "Copyright (c) dicom-ai-node contributors",
        "data_source": "none: weights set by hand in tests/integration/test_user_models.py",
        "data_type": "nibabel",
        "image_classes": "single channel data, intensity scaled to [0, 1]",
        "label_classes": "single channel data, 1 is brain, 0 is everything else",
        "pred_classes": "2 channels OneHot data, channel 1 is brain, channel 0 is background",
        "eval_metrics": {"mean_dice": 1.0},
        "intended_use": "Tests of the node's bundle runner only; not a medical model",
        "references": ["MONAI bundle specification: https://docs.monai.io/en/latest/mb_specification.html"],
        "network_data_format": {
            "inputs": {
                "image": {
                    **patch,
                    "format": "magnitude",
                    "modality": "MR",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    **patch,
                    "num_channels": 2,
                    "format": "segmentation",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "background", "1": "brain"},
                }
            },
        },
    }


def bundle_inference(*, invert: bool = True, save: bool = True, run_key: str = "run") -> dict[str, Any]:
    """configs/inference.json in the layout of the model zoo's spleen_ct_segmentation."""
    postprocessing: list[dict[str, Any]] = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    if invert:
        postprocessing.append(
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "meta_key_postfix": "meta_dict",
                "nearest_interp": False,
                "to_tensor": True,
            }
        )
    postprocessing.append({"_target_": "AsDiscreted", "keys": "pred", "argmax": True})
    if save:
        postprocessing.append(
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_postfix": "seg",
                "output_dtype": "$np.uint8",
                "resample": False,
                "squeeze_end_dims": True,
            }
        )
    config: dict[str, Any] = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/brain",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                # 1.5 x 1.5 x 2.0 mm: not the source's 0.9 x 1.1 x 2.5, so the bundle resamples.
                {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": 0,
                    "a_max": 1000,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 4,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [32, 32, 16],
            "sw_batch_size": 2,
            "overlap": 0.25,
        },
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            # As in the model zoo: CUDA mixed precision, which MONAI disables (with a warning) on a CPU.
            "amp": True,
        },
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
    }
    if run_key == "evaluating":  # bundles made before MONAI 1.2
        config["evaluating"] = ["$setattr(torch.backends.cudnn, 'benchmark', True)", "$@evaluator.run()"]
    else:
        config["run"] = ["$@evaluator.run()"]
    return config


def write_bundle(
    directory: Path,
    *,
    torchscript: bool = False,
    invert: bool = True,
    save: bool = True,
    run_key: str = "run",
    overlay: bool = True,
    pin: bool = True,
) -> Path:
    """A bundle directory; `overlay` adds the node's manifest.yaml (codes, colours, licence, sha256)."""
    (directory / "configs").mkdir(parents=True)
    (directory / "models").mkdir()
    (directory / "configs" / "metadata.json").write_text(json.dumps(bundle_metadata(), indent=2))
    (directory / "configs" / "inference.json").write_text(
        json.dumps(bundle_inference(invert=invert, save=save, run_key=run_key), indent=2)
    )
    conv = threshold_conv(40.0)
    if torchscript:
        network_file = "models/model.ts"
        save_torchscript(conv, directory / network_file)
    else:
        network_file = "models/model.pt"
        torch.save({"model": conv.state_dict()}, directory / network_file)
    if overlay:
        weights = [
            {"file": network_file, "sha256": sha256(directory / network_file)},
            {"file": "configs/inference.json", "sha256": sha256(directory / "configs" / "inference.json")},
        ]
        manifest = {
            "accepts": {"modalities": ["MR"], "body_parts": ["HEAD", "BRAIN"]},
            "licence": "Apache-2.0 (test bundle)",
            "outputs": {"segments": [{"value": 1, "type": BRAIN, "colour": [255, 160, 80]}]},
            "weights": weights if pin else [],
        }
        (directory / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return directory


# --- TorchScript models with a manifest ---------------------------------------------------------------


def write_torchscript_segmenter(directory: Path) -> Path:
    directory.mkdir(parents=True)
    save_torchscript(threshold_conv(40.0), directory / "model.ts")
    manifest = {
        "name": "ts-brain-threshold",
        "version": "1.0.0",
        "task": "segmentation",
        "format": "torchscript",
        "description": "test: brain = MR intensity above 600 (hand-set 1x1x1 convolution)",
        "accepts": {"modalities": ["MR"]},
        "input": {
            "orientation": "RAS",
            # Not the source's 0.9 x 1.1 x 2.5 mm: the node resamples there and back.
            "spacing_mm": [1.2, 1.2, 3.0],
            "intensity": {"window": [0, 1000], "normalise": "minmax"},
        },
        "inference": {"roi_size": [32, 32, 16], "overlap": 0.25},
        "outputs": {
            "activation": "softmax",
            "segments": [{"value": 1, "label": "Brain", "type": BRAIN, "colour": [255, 160, 80]}],
        },
        "weights": [{"file": "model.ts", "sha256": sha256(directory / "model.ts")}],
        "licence": "Apache-2.0 (test model)",
        "training_data": "none: weights set by hand",
        "intended_use": "tests only",
    }
    (directory / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return directory


class MeanIntensityClassifier(torch.nn.Module):
    """(N, 1, H, W) in [0, 1] -> (N, 1) logit 8 * (mean - 0.5): bright images score high."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (8.0 * (x.mean(dim=(1, 2, 3)) - 0.5)).unsqueeze(1)


def write_torchscript_classifier(directory: Path) -> Path:
    directory.mkdir(parents=True)
    save_torchscript(MeanIntensityClassifier(), directory / "model.ts")
    manifest = {
        "name": "cxr-pneumothorax-test",
        "version": "0.1.0",
        "task": "classification",
        "format": "torchscript",
        "description": "test: pneumothorax score from the mean intensity (not a medical model)",
        "accepts": {"modalities": ["CR", "DX"], "body_parts": ["CHEST"]},
        # 12-bit CR/DX pixel values: the window maps 0..4095 to 0..1.
        "input": {"size": [64, 64], "intensity": {"window": [0, 4095], "normalise": "minmax"}},
        "outputs": {
            "activation": "sigmoid",
            "findings": [{"index": 0, "finding": PNEUMOTHORAX, "threshold": 0.5}],
        },
        "weights": [{"file": "model.ts", "sha256": sha256(directory / "model.ts")}],
        "licence": "Apache-2.0 (test model)",
        "training_data": "none",
        "intended_use": "tests only",
    }
    (directory / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return directory


def radiograph(value: float, modality: str = "DX") -> Volume:
    """A single-frame chest radiograph of constant `value` (no patient geometry needed by a classifier)."""
    header = pydicom.Dataset()
    header.Modality = modality
    header.SeriesInstanceUID = pydicom.uid.generate_uid()
    header.SOPInstanceUID = pydicom.uid.generate_uid()
    header.BodyPartExamined = "CHEST"
    return Volume(
        array=np.full((1, 96, 80), value, dtype=np.float32),
        datasets=[header],
        paths=[Path("cr.dcm")],
        spacing=(1.0, 0.2, 0.2),
        affine_lps=np.diag([0.2, 0.2, 1.0, 1.0]),
        modality=modality,
    )


# --- tests --------------------------------------------------------------------------------------------


def test_bundle_manifest_from_metadata_and_overlay(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "brain_threshold_mr")
    manifest = manifest_from_bundle(bundle)
    assert manifest.name == "brain_threshold_mr"  # the directory name: what rules name
    assert (manifest.version, manifest.format, manifest.task) == ("0.2.0", "monai-bundle", "segmentation")
    assert manifest.description.startswith("A hand-set 1x1x1 convolution")
    assert manifest.training_data.startswith("none: weights set by hand")
    assert manifest.accepts.modalities == ["MR"]
    # The label name comes from channel_def, the code and colour from manifest.yaml.
    (segment,) = manifest.segment_specs
    assert (segment.label_value, segment.label, segment.rgb) == (1, "brain", (255, 160, 80))
    assert (segment.property_type.value, segment.property_type.meaning) == ("12738006", "Brain")
    assert verify_bundle(manifest) == []


def test_bundle_runs_through_monai_on_the_source_grid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = manifest_from_bundle(write_bundle(tmp_path / "bundle"))
    model = BundleModel.from_manifest(manifest, device="cpu")
    volume = mr_volume(tmp_path / "mr")
    network = model._evaluator.network
    path_entries = len(sys.path)

    with caplog.at_level(logging.INFO, logger="dicom_ai_node.infer.bundle"):
        mask = model.segment(volume)
    # Invertd + SaveImaged(resample=False) saved the mask on the source affine: taken as is.
    assert "resampling" not in caplog.text
    assert mask.shape == volume.shape and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert dice(mask, expected_mask(volume)) >= 0.98

    # Warm: a second series of another size runs on the same instantiated evaluator and network.
    other = mr_volume(tmp_path / "mr2", n_slices=10, rows=40, cols=56)
    second = model.segment(other)
    assert second.shape == other.shape
    assert dice(second, expected_mask(other)) >= 0.98
    assert model._evaluator.network is network
    assert len(sys.path) == path_entries  # MONAI's per-run sys.path insert is undone
    # Scratch files of a run do not pile up.
    assert not any((model._workdir / "in").iterdir()) and not any((model._workdir / "out").iterdir())


def test_bundle_with_torchscript_network_and_legacy_run_key(tmp_path: Path) -> None:
    # model.ts only: the bundle's CheckpointLoader (pointing at a model.pt that is not there) must not run.
    bundle = write_bundle(tmp_path / "bundle_ts", torchscript=True, run_key="evaluating")
    model = BundleModel.from_manifest(manifest_from_bundle(bundle), device="cpu")
    assert isinstance(model._evaluator.network, torch.jit.ScriptModule)
    volume = mr_volume(tmp_path / "mr")
    mask = model.segment(volume)
    assert mask.shape == volume.shape
    assert dice(mask, expected_mask(volume)) >= 0.98


@pytest.mark.parametrize("save", [True, False], ids=["saved-image", "evaluator-pred"])
def test_bundle_output_without_invertd_is_resampled_onto_the_source_grid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, save: bool
) -> None:
    # Without Invertd the bundle's mask is on its own RAS 1.5 x 1.5 x 2 mm grid: the node maps it back by
    # affine (nearest neighbour), so blockier edges but the same place. Without SaveImaged the node
    # takes the evaluator's postprocessed pred (a MetaTensor with that affine) instead of a file.
    bundle = write_bundle(tmp_path / "bundle_noinvert", invert=False, save=save)
    model = BundleModel.from_manifest(manifest_from_bundle(bundle), device="cpu")
    volume = mr_volume(tmp_path / "mr")
    with caplog.at_level(logging.INFO, logger="dicom_ai_node.infer.bundle"):
        mask = model.segment(volume)
    assert "resampling (nearest neighbour)" in caplog.text
    assert mask.shape == volume.shape
    assert dice(mask, expected_mask(volume)) >= 0.93


def test_torchscript_segmenter_mask_and_seg_line_up_with_the_source(tmp_path: Path) -> None:
    manifest = load_manifest(write_torchscript_segmenter(tmp_path / "ts-seg"))
    model = build_model(manifest, device="cpu")
    volume = mr_volume(tmp_path / "mr")
    assert model.task == "segmentation"
    mask = model.segment(volume)
    expected = expected_mask(volume)
    assert mask.shape == volume.shape
    assert dice(mask, expected) >= 0.98

    rule = RuleIdentity("mr-brain-user", 1)
    seg = encode_seg(
        source_datasets=volume.datasets,
        label_map=mask,
        segments=model.segments,
        model=model.identity,
        rule=rule,
        identity=OutputIdentity(),
        uids=result_uids(volume.series_instance_uid, model.identity, rule),
    )
    assert seg is not None
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_to_bytes(seg)))
    index = {str(ds.SOPInstanceUID): k for k, ds in enumerate(volume.datasets)}
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(index)
    frames = seg.pixel_array.reshape(-1, *volume.shape[1:])
    shared = seg.SharedFunctionalGroupsSequence[0]
    seen = set()
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        k = index[uid]
        # With one segment highdicom may put the segment identification in the shared groups.
        identification = group.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        assert identification[0].ReferencedSegmentNumber == 1
        np.testing.assert_array_equal(frame, mask[k], err_msg=f"SEG frame of source slice {k}")
        source_position = [float(v) for v in volume.datasets[k].ImagePositionPatient]
        np.testing.assert_allclose(
            [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
            source_position,
            atol=1e-3,
        )
        seen.add(k)
    # Empty frames are omitted; every slice with brain has its frame.
    assert seen == {k for k in range(volume.shape[0]) if mask[k].any()}


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def classifier_probability(normalised_mean: float) -> float:
    return float(torch.sigmoid(torch.tensor(8.0 * (normalised_mean - 0.5))))


def test_torchscript_classifier_scores_bright_and_dark_radiographs(tmp_path: Path) -> None:
    manifest = load_manifest(write_torchscript_classifier(tmp_path / "cxr"))
    model = build_model(manifest, device="cpu")
    assert model.task == "classification"
    assert model.accepts_modalities == ("CR", "DX")

    # Constant images: resizing keeps the value, so the probability is known exactly.
    (bright,) = model.classify(radiograph(0.8 * 4095))
    (dark,) = model.classify(radiograph(0.1 * 4095, modality="CR"))
    assert (bright.spec.finding.value, bright.spec.finding.meaning) == ("36118008", "Pneumothorax")
    assert bright.probability == pytest.approx(classifier_probability(0.8), abs=1e-5)
    assert dark.probability == pytest.approx(classifier_probability(0.1), abs=1e-5)
    assert bright.present and not dark.present

    # Real CR files (no Image Plane module) through the node's loader: the (antialiased) resize keeps
    # the mean of the smooth phantom to well within 0.01 of the probability.
    for brightness, present in ((0.95, True), (0.3, False)):
        volume = load_series([write_cr_image(tmp_path / f"cr-{brightness}", brightness)])
        assert volume.modality == "CR" and volume.shape[0] == 1
        (result,) = model.classify(volume)
        expected = classifier_probability(float(np.clip(volume.array, 0, 4095).mean() / 4095))
        assert result.probability == pytest.approx(expected, abs=0.01)
        assert result.present is present


def test_discovery_finds_bundles_and_torchscript_models(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_torchscript_segmenter(models / "ts-seg")
    write_torchscript_classifier(models / "cxr")
    # A bundle whose manifest.yaml is complete is read as it is, and as an overlay gives the same.
    bundle = write_bundle(models / "brain_bundle")
    complete = manifest_from_bundle(bundle).model_dump(mode="json", exclude={"directory"}, exclude_none=True)
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(complete, sort_keys=False))

    found = {m.name: m for m in discover_manifests([models])}
    assert set(found) == {"ts-brain-threshold", "cxr-pneumothorax-test", "brain_bundle"}
    assert found["brain_bundle"].format == "monai-bundle"
    assert found["brain_bundle"].segment_specs == manifest_from_bundle(bundle).segment_specs
    assert isinstance(build_model(found["brain_bundle"], device="cpu"), BundleModel)
    assert found["cxr-pneumothorax-test"].task == "classification"


def test_bundle_without_codes_is_a_config_error_naming_the_keys(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bare_bundle", overlay=False)
    with pytest.raises(ConfigError) as caught:
        discover_manifests([bundle])
    message = str(caught.value)
    assert "SNOMED code of label 1 (brain)" in message
    assert "outputs.segments" in message and "manifest.yaml" in message
    assert "licence" in message  # the bundle's metadata states no licence either


def test_tampered_and_unpinned_weights(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    manifest = manifest_from_bundle(bundle)
    with (bundle / "models" / "model.pt").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(InferenceError, match=r"models/model.pt: sha256 [0-9a-f]{64} does not match"):
        BundleModel.from_manifest(manifest, device="cpu")
    assert any("does not match" in p for p in verify_bundle(manifest))

    ts_dir = write_torchscript_segmenter(tmp_path / "ts-seg")
    ts_manifest = load_manifest(ts_dir)
    (ts_dir / "model.ts").write_bytes((ts_dir / "model.ts").read_bytes() + b"\0")
    with pytest.raises(InferenceError, match=r"model.ts: sha256 [0-9a-f]{64} does not match"):
        build_model(ts_manifest, device="cpu")

    # No sha256 pinned: `models verify` refuses it, but it loads (with a warning) for a trial run.
    unpinned = manifest_from_bundle(write_bundle(tmp_path / "unpinned", pin=False))
    assert unpinned.weights == []
    assert any("no sha256 pinned" in p for p in verify_bundle(unpinned))
    assert BundleModel.from_manifest(unpinned, device="cpu").segments


def test_bundle_overlay_rejects_node_input_keys(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    overlay = yaml.safe_load((bundle / "manifest.yaml").read_text())
    overlay["input"] = {"spacing_mm": [1, 1, 1]}
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(overlay))
    with pytest.raises(ConfigError, match="prepares its input"):
        manifest_from_bundle(bundle)
