"""minilm: a miniature mixed-precision transformer training framework."""

from minilm.amx_guard import cap_onednn_isa_if_amx_is_broken

__version__ = "0.1.0"

cap_onednn_isa_if_amx_is_broken()  # before oneDNN initializes anywhere in this process
