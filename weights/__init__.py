"""The shared model format (SPEC section 4): model directories, safetensors I/O, official .pth,
Hugging Face / fla directories (docs/interop.md)."""

from .format import (SUPPORTED_DTYPES, atomic_write, convert_dtype, load_config, load_model, save_model,
                     validate_tensors)
from .hf import export_hf, hf_caveats, import_hf, is_hf_dir
from .official import export_official_pth, import_official_pth, official_runtime_caveats
from .safetensors_io import WeightsError

__all__ = ["WeightsError", "save_model", "load_model", "load_config", "validate_tensors",
           "convert_dtype", "import_official_pth", "export_official_pth", "official_runtime_caveats", "SUPPORTED_DTYPES", "atomic_write",
           "import_hf", "export_hf", "is_hf_dir", "hf_caveats"]
