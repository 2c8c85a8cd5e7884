"""Model registry: manifests -> warm models, each built on first use and kept loaded.

Manifests come from the package (dicom_ai_node/builtin_models/<name>/manifest.yaml) and from the
directories an admin lists in `models.paths` (each either a model directory or a folder of them; a MONAI
bundle directory without a manifest.yaml is read from its configs/metadata.json). A user model with the
name of a built-in replaces it, so a site can pin its own version.

Factories are called at most once per name, under a per-name lock, so concurrent first requests of a
model load it once and requests for other models are not blocked by a slow load.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dicom_ai_node.errors import ConfigError, ModelNotFoundError
from dicom_ai_node.infer.base import Model
from dicom_ai_node.infer.manifest import MANIFEST_FILE, ModelManifest, load_manifest

log = logging.getLogger(__name__)

ModelFactory = Callable[[], Model]
BUILTIN_MODELS_DIR = Path(__file__).resolve().parent.parent / "builtin_models"


def select_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without one falls back to 'cpu'."""
    if device == "cpu":
        # No torch import for that answer: a model without torch (ct-lung-classical, a site's own
        # class) then loads in milliseconds, not the seconds importing torch takes, and its load does
        # not eat into models.inference_timeout_s.
        return "cpu"
    from dicom_ai_node.infer.torch_model import resolve_device  # deferred: imports torch

    return resolve_device(device)


class ModelRegistry:
    def __init__(self) -> None:
        self._factories: dict[str, ModelFactory] = {}
        self._manifests: dict[str, ModelManifest] = {}
        self._models: dict[str, Model] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._registry_lock = threading.Lock()

    def register(self, name: str, factory: ModelFactory, manifest: ModelManifest | None = None) -> None:
        """Add a model; registering a name again replaces its factory and drops the warm instance."""
        with self._registry_lock:
            self._factories[name] = factory
            if manifest is not None:
                self._manifests[name] = manifest
            else:
                self._manifests.pop(name, None)
            self._models.pop(name, None)
            self._locks.setdefault(name, threading.Lock())

    def register_manifest(self, manifest: ModelManifest, device: str = "auto") -> None:
        self.register(manifest.name, lambda: build_model(manifest, device), manifest)

    def names(self) -> list[str]:
        with self._registry_lock:
            return sorted(self._factories)

    def manifest(self, name: str) -> ModelManifest:
        with self._registry_lock:
            manifest = self._manifests.get(name)
        if manifest is None:
            raise ModelNotFoundError(
                f"no model manifest named '{name}' (known: {', '.join(self.names()) or 'none'})"
            )
        return manifest

    def manifests(self) -> list[ModelManifest]:
        with self._registry_lock:
            return [self._manifests[n] for n in sorted(self._manifests)]

    def is_loaded(self, name: str) -> bool:
        with self._registry_lock:
            return name in self._models

    def get(self, name: str) -> Model:
        """The warm model called `name`, loading it on first use; ModelNotFoundError if unknown."""
        with self._registry_lock:
            model = self._models.get(name)
            if model is not None:
                return model
            factory = self._factories.get(name)
            lock = self._locks.get(name)
        if factory is None or lock is None:
            raise ModelNotFoundError(f"no model named '{name}' (known: {', '.join(self.names()) or 'none'})")
        with lock:
            with self._registry_lock:
                model = self._models.get(name)
            if model is None:
                log.info("loading model %s", name)
                model = factory()
                with self._registry_lock:
                    self._models[name] = model
            return model


def build_model(manifest: ModelManifest, device: str = "auto") -> Model:
    """Construct the warm model a manifest describes (imports torch/monai only now)."""
    if manifest.format == "builtin":
        assert manifest.entry is not None  # the manifest validator requires it
        module_name, _, class_name = manifest.entry.partition(":")
        cls: Any = getattr(importlib.import_module(module_name), class_name)
        model: Model = cls(manifest=manifest, device=select_device(device))
        return model
    if manifest.format == "monai-bundle":
        from dicom_ai_node.infer.bundle import BundleModel

        return BundleModel.from_manifest(manifest, device)
    from dicom_ai_node.infer.torch_model import build_from_manifest

    built: Model = build_from_manifest(manifest, device)
    return built


def discover_manifests(paths: Iterable[Path]) -> list[ModelManifest]:
    """Manifests found in `paths`: a model directory, or a folder whose subdirectories are models."""
    found: list[ModelManifest] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ConfigError("models.paths", f"{path} does not exist")
        if _is_model_dir(path):
            found.append(_load_any(path))
            continue
        for child in sorted(p for p in path.iterdir() if p.is_dir()):
            if _is_model_dir(child):
                found.append(_load_any(child))
    return found


def _is_model_dir(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file() or (path / "configs" / "metadata.json").is_file()


def _load_any(path: Path) -> ModelManifest:
    if (path / "configs" / "metadata.json").is_file():
        from dicom_ai_node.infer.bundle_manifest import manifest_from_bundle

        # A bundle's manifest.yaml only adds what metadata.json lacks (codes, licence, sha256).
        return manifest_from_bundle(path)
    return load_manifest(path)


def default_registry(device: str = "auto", user_paths: Iterable[Path] = ()) -> ModelRegistry:
    """The built-in models plus the user models found in `user_paths` (a user model may replace one)."""
    registry = ModelRegistry()
    # Building a registry reads YAML only: torch is imported when a model first loads.
    for manifest in discover_manifests([BUILTIN_MODELS_DIR, *user_paths]):
        registry.register_manifest(manifest, device)
    return registry
