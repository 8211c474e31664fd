"""dqc runtime: bundles, engines (ONNX Runtime, TensorRT, torch reference) and the host-side sampler.

Nothing here imports torch at module level; an ONNX bundle runs with numpy and onnxruntime only.
"""

from runtime.bundle import Bundle, load_bundle
from runtime.engine import Engine, EngineSet, InputSpec, OrtEngine, TorchEngine
from runtime.errors import DqcError
from runtime.interop import as_diffusers_unet
from runtime.sampler import SamplerConfig, SampleRun, sample
from runtime.schedule import NoiseSchedule, load_schedule

__all__ = [
    "Bundle",
    "DqcError",
    "Engine",
    "EngineSet",
    "InputSpec",
    "NoiseSchedule",
    "OrtEngine",
    "SampleRun",
    "SamplerConfig",
    "TorchEngine",
    "as_diffusers_unet",
    "load_bundle",
    "load_schedule",
    "sample",
]
