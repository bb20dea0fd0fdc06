# Thin glue: the model is pagetron.backend.serving.triton_embed_model.TritonPythonModel.
from pagetron.backend.serving.triton_embed_model import TritonPythonModel  # noqa: F401
