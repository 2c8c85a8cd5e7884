"""Model registry: name -> factory; each model is built on first use and kept warm.

Factories are called at most once per name, under a per-name lock, so concurrent first requests of a
model load it once and requests for other models are not blocked by a slow load.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from dicom_ai_node.errors import ModelNotFoundError
from dicom_ai_node.infer.base import SegmentationModel

log = logging.getLogger(__name__)

ModelFactory = Callable[[], SegmentationModel]


def select_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; any other value is returned unchanged."""
    if device != "auto":
        return device
    import torch  # deferred: importing torch costs seconds and only the models need it

    # torch.cuda.is_available() returns False at once on machines without a driver.
    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelRegistry:
    def __init__(self) -> None:
        self._factories: dict[str, ModelFactory] = {}
        self._models: dict[str, SegmentationModel] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._registry_lock = threading.Lock()

    def register(self, name: str, factory: ModelFactory) -> None:
        """Add a model; registering a name again replaces its factory and drops the warm instance."""
        with self._registry_lock:
            self._factories[name] = factory
            self._models.pop(name, None)
            self._locks.setdefault(name, threading.Lock())

    def names(self) -> list[str]:
        with self._registry_lock:
            return sorted(self._factories)

    def is_loaded(self, name: str) -> bool:
        with self._registry_lock:
            return name in self._models

    def get(self, name: str) -> SegmentationModel:
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


def default_registry(device: str = "auto") -> ModelRegistry:
    """The built-in models: 'mr-brain' (deepbet CNN) and 'ct-lung-classical' (threshold + components)."""
    from dicom_ai_node.infer.models.brain_deepbet import MODEL_NAME as BRAIN
    from dicom_ai_node.infer.models.brain_deepbet import DeepbetBrainModel
    from dicom_ai_node.infer.models.lung_classical import MODEL_NAME as LUNG
    from dicom_ai_node.infer.models.lung_classical import ClassicalLungModel

    registry = ModelRegistry()
    # The device is resolved when the model loads, so building a registry never imports torch.
    registry.register(BRAIN, lambda: DeepbetBrainModel(device=select_device(device)))
    registry.register(LUNG, ClassicalLungModel)
    return registry
