"""lora_tutorial: LoRA and other PEFT methods on a real pretrained GPT, in small readable PyTorch.

The notebooks call this package; nothing in them defines model, data or training code.
"""

from .checkpoints import DEFAULT_MODEL, CheckpointError, load_base_model, load_tokenizer
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "CheckpointError", "GPT", "GPTConfig", "Tokenizer", "load_base_model", "load_tokenizer"]
__version__ = "0.1.0"
