"""Hugging Face export (`python -m pretrain.convert CKPT --hf OUT`, pretrain/convert.py).

`modeling_dlm.py` here is a template: it is copied into the export, next to copies of the model's own
files (pretrain/model/), and is only ever imported by `transformers` from there. Nothing in this
package imports `transformers`, which stays an optional extra (`pip install dlm-pretrain[hf]`).
"""
