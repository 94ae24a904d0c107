"""The only code that knows transformers internals (as peft's tuners do): attaching steering to a model,
running a model from layer L on cached inputs, KV-cache tricks, packing masks, padding, and loading models.

Layout after peft's ``tuners/<method>/{layer,model}.py``: ``steer/layer.py`` (the modules that stand in a
model), ``steer/model.py`` (attach, the ``Steering`` handle, save/load). Every internal relied on is listed
in ``internals.py`` with the transformers versions it was tested on.
"""
from . import compat
from .attention import gqa_attention
from .export import export_steering
from .kv import (affine_in_m, alias_skipped, cache_of, keys_values_only, layer_states, new_cache, repeat_rows,
                 window_shorter_than)
from .loading import (DEFAULT_MODEL_NAME, cache_dir, default_gguf, default_model_folder, load_config, load_default_model,
                      load_model, load_tokenizer, model_folder)
from .packing import PackedRows, SideRows, packable
from .runner import (capture_layer_input, capture_site_output, completion_positions, decoder, decoder_layers, from_layer, last_hidden,
                     layer_outputs, lm_head, logit_softcap, model_name, pad, pad_id_of, pad_rows)
from .steer.layer import ResidualSteer
from .steer.model import (SITES, Steering, attach, check_steering_metadata, load_steering, read_steering_metadata,
                          resolve_layer)

__all__ = ["compat", "gqa_attention", "export_steering", "attach", "Steering", "load_steering", "read_steering_metadata", "check_steering_metadata", "resolve_layer", "ResidualSteer", "SITES",
           "load_default_model", "load_model", "load_config", "cache_dir", "DEFAULT_MODEL_NAME", "default_gguf",
           "default_model_folder", "model_folder", "load_tokenizer",
           "decoder", "decoder_layers", "lm_head", "logit_softcap", "model_name", "capture_layer_input", "capture_site_output",
           "from_layer", "last_hidden", "layer_outputs", "pad", "pad_rows", "pad_id_of", "completion_positions",
           "keys_values_only", "alias_skipped", "affine_in_m", "new_cache", "repeat_rows", "window_shorter_than",
           "layer_states", "cache_of", "SideRows", "PackedRows", "packable"]
