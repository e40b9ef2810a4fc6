"""The names in an adapter folder (PEFT's files, and where graftlm keeps the base fingerprint), without
importing torch, so that the registry and the pipeline can read them."""

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FINGERPRINT_KEY = "graftlm.base_fingerprint"  # in the safetensors metadata
