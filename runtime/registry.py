"""Registers the converted model classes with transformers' Auto classes.

Once ``sparsek.runtime`` is imported, ``AutoModelForCausalLM.from_pretrained(converted_folder)``
uses these classes (no ``trust_remote_code`` needed); they load the same weights as the remote
code shipped in the folder.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_sparsek import CONFIG_CLASSES
from .modeling_sparsek import MODEL_CLASSES, register_attention


def register_auto_classes() -> None:
    register_attention()
    for base, config_cls in CONFIG_CLASSES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, MODEL_CLASSES[base], exist_ok=True)
