# Session-scoped fixtures that build the real models once (cached on disk across runs).
from onnxpress.models.testing import digits_cnn_path, digits_mlp_path, lm_path, minilm_path  # noqa: F401
