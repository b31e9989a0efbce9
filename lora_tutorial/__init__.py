"""lora_tutorial: LoRA and other PEFT methods on a real pretrained GPT, in small readable PyTorch.

The notebooks call this package; nothing in them defines model, data or training code. Where to start
reading: ARCHITECTURE.md (one line per module, and the path from a jsonl line to EM/F1).
"""

from .config import load_config
from .generation import generate
from .model import GPT, GPTConfig
from .pretrained import DEFAULT_MODEL, CheckpointError, load_base_model, load_tokenizer
from .tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "CheckpointError", "GPT", "GPTConfig", "Tokenizer", "generate", "load_base_model",
           "load_config", "load_tokenizer"]
__version__ = "0.2.0"
