"""Interoperability with other libraries' checkpoints.

``interop.marian``: Hugging Face MarianMT / OPUS-MT models (load, translate, fine-tune in a
work directory, export back). Needs the ``interop`` extra (safetensors; torch and
transformers only for the tests and for ``pytorch_model.bin`` files).
"""
