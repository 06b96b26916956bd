"""HuggingFace transformers backend: HF MoE models run their experts through flexmoe.

Importing this module registers the experts implementation "flexmoe", so

    import flexmoe.integrations.hf
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="flexmoe")
    # or: model.set_experts_implementation("flexmoe")

runs flexmoe's dispatch plan, permute, grouped GEMMs and combine on HF's own expert weights
(forward and backward). ``patch(model)`` does the same for experts modules that HF does not
dispatch through its experts interface.
"""

try:
    from transformers.integrations.moe import ExpertsInterface  # noqa: F401
except ImportError as err:
    raise ImportError(
        "flexmoe.integrations.hf needs HuggingFace transformers >= 5.0 (with its experts interface): "
        "pip install 'flexmoe[hf]'"
    ) from err

from .backend import IMPLEMENTATION, expert_blocks, flexmoe_experts_forward, patch, register, unpatch
from .convert import moe_config_from_hf, moe_layer_from_hf, moe_state_dict_from_hf
from .experts import experts_forward
from .layout import ExpertsLayout, UnsupportedBlockError, experts_layout

register()

__all__ = [
    "IMPLEMENTATION",
    "ExpertsLayout",
    "UnsupportedBlockError",
    "expert_blocks",
    "experts_forward",
    "experts_layout",
    "flexmoe_experts_forward",
    "moe_config_from_hf",
    "moe_layer_from_hf",
    "moe_state_dict_from_hf",
    "patch",
    "register",
    "unpatch",
]
