"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters, IA3 and p-tuning on ``lora_tutorial.GPT``.

Usage, as in NeMo::

    from lora_tutorial.peft import LoraPEFTConfig, add_adapter, save_adapters
    add_adapter(model, LoraPEFTConfig(cfg.model))      # freezes the base, inserts LoRA, prints a summary
    ...train...
    save_adapters(model, "runs/lora/adapter.safetensors")

==========  ==============================  =====================================  ======================
method      where (file)                    what is learned                        SmolLM2, defaults
==========  ==============================  =====================================  ======================
lora        four projections (lora.py)      low-rank update B A of each weight     8,110,080 (r 32)
adapter     after attention & MLP           bottleneck MLP added to the output     2,280,960 (dim 32)
            (adapter.py)
ia3         keys, values, FFN activation    element-wise scaling vectors           57,600
            (ia3.py)
ptuning     before the input (ptuning.py)   10 virtual token embeddings (via MLP)  1,650,240
==========  ==============================  =====================================  ======================

The other files: ``config.py`` (the method configs), ``wrapping.py`` (the wrapper protocol and the
module surgery), ``inject.py`` (``add_adapter``, ``disable_adapters``), ``multi.py`` (several named
adapters on one base), ``checkpoint.py`` (adapter files), ``hf_export.py`` (LoRA to Hugging Face PEFT)
and ``lora_init.py`` (PiSSA / OLoRA initialisation).
"""

from .checkpoint import AdapterCheckpointError, load_adapters, save_adapters
from .config import (AdapterPEFTConfig, IA3PEFTConfig, LoraPEFTConfig, PEFTConfig, PtuningPEFTConfig,
                     peft_configs_from_scheme)
from .hf_export import export_hf_peft
from .inject import (ParameterSummary, add_adapter, adapter_parameters, disable_adapters, parameter_summary,
                     remove_adapters)
from .lora import LoRALinear, merge_and_unload, merge_lora, unmerge_lora
from .multi import active_adapters, adapter_names, combine_lora, set_adapter
from .ptuning import freeze_prompt_encoder

__all__ = [
    "PEFTConfig", "LoraPEFTConfig", "AdapterPEFTConfig", "IA3PEFTConfig", "PtuningPEFTConfig",
    "peft_configs_from_scheme",
    "add_adapter", "remove_adapters", "disable_adapters", "adapter_parameters", "parameter_summary", "ParameterSummary",
    "LoRALinear", "merge_lora", "unmerge_lora", "merge_and_unload", "freeze_prompt_encoder",
    "save_adapters", "load_adapters", "AdapterCheckpointError", "export_hf_peft",
    "adapter_names", "active_adapters", "set_adapter", "combine_lora",
]
